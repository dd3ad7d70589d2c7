// softcuda runtime: executes a kernel launch (grid, block, arguments) on host memory, one host
// thread per CUDA thread of a block, blocks one at a time (in order, or shuffled by a seed so
// that code assuming an order fails), __shared__ storage poisoned (all bits set: NaN for
// floats) before every block. It is a process of its own, serving launch requests on stdin
// (protocol below), so AddressSanitizer and UndefinedBehaviorSanitizer reports, a deadlocked
// barrier (killed by a watchdog) or a crash end this process and reach the test as an error
// instead of taking the test harness down.
//
// Buffers are allocated per launch at their exact size (256-byte aligned, like cudaMalloc):
// a read or write one byte past the end is an ASan report. The registry of kernels is built
// from the kernel sources themselves (see build.rs): every `extern "C"` function there.

#include <algorithm>
#include <atomic>
#include <barrier>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <numeric>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include <pthread.h>
#include <unistd.h>

#include "softcuda.h"
#include "softcuda_registry.h"

thread_local uint3 threadIdx;
thread_local dim3 blockIdx;
thread_local dim3 blockDim;
thread_local dim3 gridDim;

// The __shared__ section's bounds (GNU ld defines them for a section with a C name).
extern "C" char __start_softcuda_shared[] __attribute__((weak));
extern "C" char __stop_softcuda_shared[] __attribute__((weak));

namespace softcuda {

std::vector<Kernel>& registry() {
    static std::vector<Kernel> r;
    return r;
}

Registrar::Registrar(const char* name, Invoke invoke, std::vector<size_t> sizes) {
    registry().push_back(Kernel{name, invoke, std::move(sizes)});
}

[[noreturn]] void fail(const char* what) {
    std::fprintf(stderr, "softcuda: %s\n", what);
    std::fflush(stderr);
    std::_Exit(3);
}

namespace {

struct Warp {
    std::unique_ptr<std::barrier<>> sync;
    uint32_t slots[32] = {};
    std::atomic<int> exited{0};
    int lanes = 0;
};

struct Block {
    std::unique_ptr<std::barrier<>> sync;
    std::vector<std::unique_ptr<Warp>> warps;
};

thread_local Block* current_block = nullptr;
thread_local unsigned current_linear = 0;

}  // namespace

void syncthreads() { current_block->sync->arrive_and_wait(); }

uint32_t shfl_xor(uint32_t mask, uint32_t bits, int xor_mask) {
    Warp& w = *current_block->warps[current_linear / 32];
    const int lane = current_linear % 32;
    if (mask != 0xffffffffu) fail("__shfl_xor_sync with a partial mask is not supported");
    if (w.lanes != 32) fail("__shfl_xor_sync in a partial warp (block size not a multiple of 32)");
    if (w.exited.load() != 0) fail("__shfl_xor_sync after lanes of the warp exited (divergence)");
    w.slots[lane] = bits;
    w.sync->arrive_and_wait();
    const int from = lane ^ xor_mask;
    const uint32_t got = from < 32 ? w.slots[from] : bits;
    w.sync->arrive_and_wait();
    return got;
}

namespace {

// ---- the request protocol (little-endian, stdin → stdout) ----
// request:  u32 op (1 launch, 2 list kernels, 3 quit)
// launch:   str name; u32 grid[3]; u32 block[3]; u32 shared; u64 order_seed;
//           u32 nbufs, {u64 len, bytes}×nbufs; u32 nargs, arg×nargs
// arg:      u8 kind: 1 pointer {u32 buf, u64 offset}; 2 scalar {u32 len, bytes};
//           3 struct {u32 len, bytes, u32 nptr, {u32 at, u32 buf, u64 offset}×nptr}
// reply:    u32 0, {u64 len, bytes}×nbufs   |   u32 1, str message
// list:     u32 n, {str name, u32 nparams, u32 size×nparams}×n

void read_exact(void* p, size_t n) {
    if (n && std::fread(p, 1, n, stdin) != n) std::_Exit(0);  // the client went away
}
template <typename T> T rd() {
    T v;
    read_exact(&v, sizeof v);
    return v;
}
std::string rd_str() {
    std::string s(rd<uint32_t>(), '\0');
    read_exact(s.data(), s.size());
    return s;
}
void wr(const void* p, size_t n) { std::fwrite(p, 1, n, stdout); }
template <typename T> void wr(T v) { wr(&v, sizeof v); }
void wr_str(const std::string& s) {
    wr<uint32_t>(s.size());
    wr(s.data(), s.size());
}

struct Arg {
    std::vector<unsigned char> bytes;  // the value (pointers patched in below)
    struct Ptr {
        uint32_t at, buf;
        uint64_t offset;
    };
    std::vector<Ptr> ptrs;
};

struct Buf {
    unsigned char* p = nullptr;
    size_t len = 0;
    ~Buf() { std::free(p); }
};

const Kernel* find(const std::string& name) {
    for (auto& k : registry())
        if (name == k.name) return &k;
    return nullptr;
}

// Runs every block of a launch, one block at a time, on one host thread per CUDA thread of a
// block (the same threads for every block: starting threads costs more than most blocks).
void run_blocks(const Kernel& k, void** argv, dim3 grid, dim3 block, const std::vector<dim3>& order) {
    const unsigned threads = block.x * block.y * block.z;
    std::vector<Block> blocks(order.size());
    for (Block& blk : blocks) {
        blk.sync = std::make_unique<std::barrier<>>(threads);
        for (unsigned w = 0; w < (threads + 31) / 32; ++w) {
            auto warp = std::make_unique<Warp>();
            warp->lanes = std::min(32u, threads - 32 * w);
            warp->sync = std::make_unique<std::barrier<>>(warp->lanes);
            blk.warps.push_back(std::move(warp));
        }
    }
    // Between blocks: every thread and this one meet, and this one poisons shared memory.
    std::barrier<> gate(threads + 1);
    struct Ctx {
        const Kernel* k;
        void** argv;
        dim3 grid, block;
        const std::vector<dim3>* order;
        std::vector<Block>* blocks;
        std::barrier<>* gate;
        unsigned linear;
    };
    std::vector<Ctx> ctx(threads);
    std::vector<pthread_t> ids(threads);
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, 1 << 20);
    for (unsigned t = 0; t < threads; ++t) {
        ctx[t] = Ctx{&k, argv, grid, block, &order, &blocks, &gate, t};
        auto body = [](void* raw) -> void* {
            Ctx& c = *static_cast<Ctx*>(raw);
            gridDim = c.grid;
            blockDim = c.block;
            threadIdx = dim3{c.linear % c.block.x, (c.linear / c.block.x) % c.block.y,
                             c.linear / (c.block.x * c.block.y)};
            current_linear = c.linear;
            for (size_t i = 0; i < c.order->size(); ++i) {
                c.gate->arrive_and_wait();  // the block's shared memory is poisoned
                Block& blk = (*c.blocks)[i];
                blockIdx = (*c.order)[i];
                current_block = &blk;
                c.k->invoke(c.argv);
                Warp& w = *blk.warps[c.linear / 32];
                w.exited.fetch_add(1);
                w.sync->arrive_and_drop();
                blk.sync->arrive_and_drop();
                c.gate->arrive_and_wait();  // every thread of the block is done
            }
            return nullptr;
        };
        if (pthread_create(&ids[t], &attr, body, &ctx[t]) != 0) fail("cannot start a thread");
    }
    for (size_t i = 0; i < order.size(); ++i) {
        if (__start_softcuda_shared != nullptr)
            std::memset(__start_softcuda_shared, 0xff, __stop_softcuda_shared - __start_softcuda_shared);
        gate.arrive_and_wait();
        gate.arrive_and_wait();
    }
    for (auto& id : ids) pthread_join(id, nullptr);
    pthread_attr_destroy(&attr);
}

std::string launch() {
    const std::string name = rd_str();
    dim3 grid{rd<uint32_t>(), rd<uint32_t>(), rd<uint32_t>()};
    dim3 block{rd<uint32_t>(), rd<uint32_t>(), rd<uint32_t>()};
    const uint32_t shared = rd<uint32_t>();
    const uint64_t seed = rd<uint64_t>();
    std::vector<Buf> bufs(rd<uint32_t>());
    for (auto& b : bufs) {
        b.len = rd<uint64_t>();
        if (posix_memalign(reinterpret_cast<void**>(&b.p), 256, b.len ? b.len : 1) != 0)
            return "out of memory";
        read_exact(b.p, b.len);
    }
    std::vector<Arg> args(rd<uint32_t>());
    for (auto& a : args) {
        const uint8_t kind = rd<uint8_t>();
        if (kind == 1) {
            a.bytes.resize(8);
            a.ptrs.push_back({0, rd<uint32_t>(), rd<uint64_t>()});
        } else if (kind == 2 || kind == 3) {
            a.bytes.resize(rd<uint32_t>());
            read_exact(a.bytes.data(), a.bytes.size());
            if (kind == 3) {
                const uint32_t n = rd<uint32_t>();
                for (uint32_t i = 0; i < n; ++i) a.ptrs.push_back({rd<uint32_t>(), rd<uint32_t>(), rd<uint64_t>()});
            }
        } else {
            return "unknown argument kind " + std::to_string(kind);
        }
    }
    const Kernel* k = find(name);
    if (k == nullptr) return "no kernel `" + name + "`";
    if (shared != 0) return "dynamic shared memory is not supported (no kernel uses it)";
    if (args.size() != k->sizes.size())
        return "kernel `" + name + "` takes " + std::to_string(k->sizes.size()) + " arguments, " +
               std::to_string(args.size()) + " given";
    const unsigned threads = block.x * block.y * block.z;
    if (threads == 0 || threads > 1024) return "a block of " + std::to_string(threads) + " threads";
    if (grid.x == 0 || grid.y == 0 || grid.z == 0) return "an empty grid";
    // Arguments in aligned storage, pointers patched to the buffers.
    std::vector<std::unique_ptr<uint64_t[]>> store;
    std::vector<void*> argv;
    for (size_t i = 0; i < args.size(); ++i) {
        Arg& a = args[i];
        if (a.bytes.size() != k->sizes[i])
            return "argument " + std::to_string(i) + " of `" + name + "` is " +
                   std::to_string(a.bytes.size()) + " bytes; the kernel's parameter is " +
                   std::to_string(k->sizes[i]);
        for (auto& p : a.ptrs) {
            if (p.buf >= bufs.size() || p.offset > bufs[p.buf].len || p.at + 8 > a.bytes.size())
                return "argument " + std::to_string(i) + " points outside its buffer";
            const uint64_t addr = reinterpret_cast<uint64_t>(bufs[p.buf].p) + p.offset;
            std::memcpy(a.bytes.data() + p.at, &addr, 8);
        }
        store.emplace_back(new uint64_t[(a.bytes.size() + 7) / 8 + 1]);
        std::memcpy(store.back().get(), a.bytes.data(), a.bytes.size());
        argv.push_back(store.back().get());
    }
    std::vector<dim3> blocks;
    for (unsigned z = 0; z < grid.z; ++z)
        for (unsigned y = 0; y < grid.y; ++y)
            for (unsigned x = 0; x < grid.x; ++x) blocks.push_back(dim3{x, y, z});
    if (seed != 0) std::shuffle(blocks.begin(), blocks.end(), std::mt19937_64(seed));
    alarm(120);  // a barrier that never completes ends the process
    run_blocks(*k, argv.data(), grid, block, blocks);
    alarm(0);
    wr<uint32_t>(0);
    for (auto& b : bufs) {
        wr<uint64_t>(b.len);
        wr(b.p, b.len);
    }
    return "";
}

}  // namespace
}  // namespace softcuda

int main() {
    using namespace softcuda;
    for (;;) {
        const uint32_t op = rd<uint32_t>();
        if (op == 1) {
            const std::string err = launch();
            if (!err.empty()) {
                wr<uint32_t>(1);
                wr_str(err);
            }
        } else if (op == 2) {
            wr<uint32_t>(registry().size());
            for (auto& k : registry()) {
                wr_str(k.name);
                wr<uint32_t>(k.sizes.size());
                for (size_t s : k.sizes) wr<uint32_t>(s);
            }
        } else {
            return 0;
        }
        std::fflush(stdout);
    }
}
