//! [`BatchedLinalg`] on the GPU: cuBLAS strided-batched GEMMs over device batches, so the
//! batched randomized SVD of [`crate::evolve::batched_svd`] factorises task vectors there.

use std::ffi::c_void;

use cudarc::cublas::result::gemm_strided_batched_ex;
use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType};
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut};

use super::{cuda_err, CudaBackend};
use crate::error::{Error, Result};
use crate::evolve::batched_svd::{randomized_svd_batch, BatchedLinalg};
use crate::evolve::{Factors, RandomizedSvd};

/// A column-major device batch: `batch` matrices of `rows × cols`, each `rows·cols` apart.
pub struct Batch {
    data: CudaSlice<f32>,
    rows: usize,
    cols: usize,
    batch: usize,
}

impl Batch {
    fn stride(&self) -> i64 {
        (self.rows * self.cols) as i64
    }
}

impl BatchedLinalg for CudaBackend {
    type Mat = Batch;

    fn upload(&self, host: &[f32], rows: usize, cols: usize, batch: usize) -> Result<Batch> {
        Ok(Batch {
            data: self
                .stream
                .clone_htod(host)
                .map_err(|e| cuda_err("factorize: upload", e))?,
            rows,
            cols,
            batch,
        })
    }

    fn upload_members(&self, members: &[&[f32]], rows: usize, cols: usize) -> Result<Batch> {
        let size = rows * cols;
        let mut data = self.alloc_f32(size * members.len())?;
        for (i, member) in members.iter().enumerate() {
            if member.len() != size {
                return Err(Error::invalid(format!(
                    "factorize: member {i} holds {} values, not {rows}×{cols}",
                    member.len()
                )));
            }
            let mut view = data.slice_mut(i * size..(i + 1) * size);
            self.stream
                .memcpy_htod(*member, &mut view)
                .map_err(|e| cuda_err("factorize: upload", e))?;
        }
        Ok(Batch {
            data,
            rows,
            cols,
            batch: members.len(),
        })
    }

    fn zeros(&self, rows: usize, cols: usize, batch: usize) -> Result<Batch> {
        Ok(Batch {
            data: self.alloc_f32(rows * cols * batch)?,
            rows,
            cols,
            batch,
        })
    }

    fn dims(&self, m: &Batch) -> (usize, usize, usize) {
        (m.rows, m.cols, m.batch)
    }

    fn gemm(&self, c: &mut Batch, a: &Batch, ta: bool, b: &Batch, tb: bool) -> Result<()> {
        let (m, k) = if ta {
            (a.cols, a.rows)
        } else {
            (a.rows, a.cols)
        };
        let (kb, n) = if tb {
            (b.cols, b.rows)
        } else {
            (b.rows, b.cols)
        };
        if k != kb || c.rows != m || c.cols != n || a.batch != c.batch || b.batch != c.batch {
            return Err(Error::invalid(format!(
                "factorize: GEMM shapes {m}×{k} · {kb}×{n} into {}×{}",
                c.rows, c.cols
            )));
        }
        self.ctx
            .bind_to_thread()
            .map_err(|e| cuda_err("binding the context", e))?;
        let op = |t: bool| {
            if t {
                cublasOperation_t::CUBLAS_OP_T
            } else {
                cublasOperation_t::CUBLAS_OP_N
            }
        };
        let (alpha, beta) = (1.0f32, 0.0f32);
        let stream = &self.stream;
        let (ap, _ga) = a.data.device_ptr(stream);
        let (bp, _gb) = b.data.device_ptr(stream);
        let (sa, sb, sc, lda, ldb, ldc) =
            (a.stride(), b.stride(), c.stride(), a.rows, b.rows, c.rows);
        let (cp, _gc) = c.data.device_ptr_mut(stream);
        // SAFETY: every operand holds `batch` matrices of the checked shapes.
        unsafe {
            gemm_strided_batched_ex(
                *self.blas.handle(),
                op(ta),
                op(tb),
                m as i32,
                n as i32,
                k as i32,
                &alpha as *const f32 as *const c_void,
                ap as *const c_void,
                cudaDataType::CUDA_R_32F,
                lda as i32,
                sa,
                bp as *const c_void,
                cudaDataType::CUDA_R_32F,
                ldb as i32,
                sb,
                &beta as *const f32 as *const c_void,
                cp as *mut c_void,
                cudaDataType::CUDA_R_32F,
                ldc as i32,
                sc,
                c.batch as i32,
                cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT_TENSOR_OP,
            )
        }
        .map_err(|e| cuda_err("cuBLAS batched GEMM (factorize)", e))
    }

    fn download(&self, b: &Batch) -> Result<Vec<f32>> {
        let v = self
            .stream
            .clone_dtoh(&b.data)
            .map_err(|e| cuda_err("factorize: download", e))?;
        self.stream
            .synchronize()
            .map_err(|e| cuda_err("factorize: synchronise", e))?;
        Ok(v)
    }
}

impl CudaBackend {
    /// Rank-`rank` randomized SVD of each row-major `[m, n]` matrix, batched on this GPU.
    pub fn randomized_svd_batch(
        &self,
        mats: &[&[f32]],
        m: usize,
        n: usize,
        rank: usize,
        opts: RandomizedSvd,
        seeds: &[u64],
    ) -> Result<Vec<Factors>> {
        randomized_svd_batch(self, mats, m, n, rank, opts, seeds)
    }
}
