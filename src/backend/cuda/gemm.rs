//! cuBLAS GEMMs on raw device pointers, for the two places where the hand-written kernels stop
//! paying: batched `matmul_t` (more rows than the matvec kernel's 8-row groups serve well;
//! tensor cores need cuBLAS's tiling) and the low-rank products of materialisation.
//! Row-major operands are passed to column-major cuBLAS as their transposes.

use std::ffi::c_void;

use cudarc::cublas::result::gemm_ex;
use cudarc::cublas::sys::{cublasComputeType_t, cublasOperation_t, cudaDataType};

use cudarc::driver::{DevicePtr, DevicePtrMut};

use super::{cuda_err, CudaBackend, CudaBuf, CudaWeight};
use crate::error::{Error, Result};
use crate::model::DType;

pub(super) fn data_type(d: DType) -> cudaDataType {
    match d {
        DType::F32 => cudaDataType::CUDA_R_32F,
        DType::F16 => cudaDataType::CUDA_R_16F,
        DType::BF16 => cudaDataType::CUDA_R_16BF,
    }
}

/// How the f32 products accumulate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Precision {
    /// f32 FMA throughout (bit-comparable with the CPU reference up to summation order).
    F32,
    /// TF32 tensor cores with f32 accumulation: for products that are rounded to a 16-bit
    /// dtype afterwards, where TF32's 10-bit mantissa is below the output's rounding.
    Tf32,
}

impl CudaBackend {
    /// `c [n, n] = b · aᵀ` for bf16 `a`, `b` (f32 out): the GEMM ceiling `bench` measures.
    pub fn gemm_ceiling(
        &self,
        c: &mut CudaBuf,
        a: &CudaWeight,
        b: &CudaWeight,
        n: usize,
    ) -> Result<()> {
        if n == 0
            || a.numel() != n * n
            || b.numel() != n * n
            || c.len() < n * n
            || a.dtype != b.dtype
        {
            return Err(Error::invalid(
                "gemm_ceiling: operands are not n×n of one dtype",
            ));
        }
        let stream = self.stream.clone();
        let (ap, _ga) = a.data.device_ptr(&stream);
        let (bp, _gb) = b.data.device_ptr(&stream);
        let (cp, _gc) = c.dev_mut()?.device_ptr_mut(&stream);
        // SAFETY: sizes checked above.
        unsafe { self.gemm_xwt(cp, bp, ap, a.dtype, n, n, n) }
    }

    /// Row-major `out[rows, n] = x[rows, k] · w[n, k]ᵀ`, `x` and `w` of dtype `dt`, out f32.
    ///
    /// # Safety
    /// The pointers must address device buffers of at least those sizes.
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn gemm_xwt(
        &self,
        out: u64,
        x: u64,
        w: u64,
        dt: DType,
        rows: usize,
        n: usize,
        k: usize,
    ) -> Result<()> {
        // cuBLAS runs in the thread's current context: make it this device's.
        self.ctx
            .bind_to_thread()
            .map_err(|e| cuda_err("binding the context", e))?;
        // Column-major: outᵀ [n, rows] = (w as [k, n])ᵀ · (x as [k, rows]).
        let (alpha, beta) = (1.0f32, 0.0f32);
        unsafe {
            gemm_ex(
                *self.blas.handle(),
                cublasOperation_t::CUBLAS_OP_T,
                cublasOperation_t::CUBLAS_OP_N,
                n as i32,
                rows as i32,
                k as i32,
                &alpha as *const f32 as *const c_void,
                w as *const c_void,
                data_type(dt),
                k as i32,
                x as *const c_void,
                data_type(dt),
                k as i32,
                &beta as *const f32 as *const c_void,
                out as *mut c_void,
                cudaDataType::CUDA_R_32F,
                n as i32,
                cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cudarc::cublas::sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT_TENSOR_OP,
            )
        }
        .map_err(|e| cuda_err("cuBLAS GEMM (matmul_t)", e))
    }

    /// Row-major f32 `c[m, n] = a[m, k] · b[k, n] + beta · c`.
    ///
    /// # Safety
    /// The pointers must address device f32 buffers of at least those sizes.
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn gemm_f32(
        &self,
        c: u64,
        a: u64,
        b: u64,
        m: usize,
        n: usize,
        k: usize,
        beta: f32,
        precision: Precision,
    ) -> Result<()> {
        let alpha = 1.0f32;
        let compute = match precision {
            Precision::F32 => cublasComputeType_t::CUBLAS_COMPUTE_32F,
            Precision::Tf32 => cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_TF32,
        };
        self.ctx
            .bind_to_thread()
            .map_err(|e| cuda_err("binding the context", e))?;
        // Column-major: cᵀ [n, m] = (b as [n, k]) · (a as [k, m]).
        unsafe {
            gemm_ex(
                *self.blas.handle(),
                cublasOperation_t::CUBLAS_OP_N,
                cublasOperation_t::CUBLAS_OP_N,
                n as i32,
                m as i32,
                k as i32,
                &alpha as *const f32 as *const c_void,
                b as *const c_void,
                cudaDataType::CUDA_R_32F,
                n as i32,
                a as *const c_void,
                cudaDataType::CUDA_R_32F,
                k as i32,
                &beta as *const f32 as *const c_void,
                c as *mut c_void,
                cudaDataType::CUDA_R_32F,
                n as i32,
                compute,
                cudarc::cublas::sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT_TENSOR_OP,
            )
        }
        .map_err(|e| cuda_err("cuBLAS GEMM (f32)", e))
    }
}
