// The runtime's table of kernels: every `extern "C"` function of a kernel source registers
// itself, with the byte size of each parameter, by a line that build.rs appends to a copy of
// the source (`SOFTCUDA_REGISTER(name)`), so the runtime can call it with arguments packed as
// a driver's kernelParams are, and check their sizes first.
#pragma once

#include <cstddef>
#include <utility>
#include <vector>

namespace softcuda {

using Invoke = void (*)(void** args);

struct Kernel {
    const char* name;
    Invoke invoke;
    std::vector<size_t> sizes;
};

std::vector<Kernel>& registry();

struct Registrar {
    Registrar(const char* name, Invoke invoke, std::vector<size_t> sizes);
};

template <typename F> struct Adaptor;
template <typename... A> struct Adaptor<void(A...)> {
    template <void (*F)(A...), size_t... I>
    static void call_with(void** a, std::index_sequence<I...>) {
        F(*static_cast<A*>(a[I])...);
    }
    template <void (*F)(A...)> static void call(void** a) {
        call_with<F>(a, std::index_sequence_for<A...>{});
    }
    static std::vector<size_t> sizes() { return {sizeof(A)...}; }
};

}  // namespace softcuda

#define SOFTCUDA_REGISTER(name)                                                       \
    static softcuda::Registrar softcuda_registrar_##name(                             \
        #name, &softcuda::Adaptor<decltype(name)>::call<&name>,                       \
        softcuda::Adaptor<decltype(name)>::sizes());
