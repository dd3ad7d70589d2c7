//! The materialisation op's inputs, shared by every backend. One tensor of a child is
//! `θ = (1 − Σ a_e)·θ_b + Σ a_e·θ_e + Σ_e U_e·diag(c_e)·V_eᵀ` (`cycleqd.md` §7, with
//! `c_e = γ_e − a_e·S_e`), accumulated in f32 and rounded once to the output dtype.
//!
//! [`TensorSources`] is what a tensor reads (base, experts, factors: views of the memory-mapped
//! checkpoints and of the expert set's factors, so cloning one copies no weights);
//! [`TensorCoefficients`] is what a child sets. A backend places the sources of a whole model
//! where it computes once ([`super::Backend::place_sources`]) and writes every child into the
//! same weights ([`super::Backend::materialize_into`]).

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::model::{DType, HostTensor};

/// One expert's rank-`rank` factors of a task vector: `U` `[m, rank]` and `Vᵀ` `[rank, n]`,
/// row-major, shared with the expert set (never copied per worker on the CPU).
#[derive(Clone, Debug, PartialEq)]
pub struct LowRankFactors {
    pub u: Arc<[f32]>,
    pub vt: Arc<[f32]>,
    pub rank: usize,
}

/// Everything one tensor's materialisation reads. Sources are `[m, n]` (a 1-D tensor is
/// `[1, len]`), all of the base's dtype; `factors` has one entry per expert for factorised
/// tensors and is empty otherwise.
#[derive(Clone, Debug)]
pub struct TensorSources {
    pub name: String,
    pub base: HostTensor,
    pub experts: Vec<HostTensor>,
    pub factors: Vec<LowRankFactors>,
    pub m: usize,
    pub n: usize,
}

/// One tensor's coefficients of a child: `a` per expert, and `c` = every expert's `c_e`
/// concatenated in expert order (length `Σ rank_e`; empty for unfactorised tensors).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TensorCoefficients {
    pub a: Vec<f32>,
    pub c: Vec<f32>,
}

/// Where [`super::Backend::place_sources`] puts the sources (the CPU has one place: the host).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placement {
    /// Resident when every source fits in device memory with `reserve_bytes` left over (for
    /// the child's weights, the KV cache and activations), streamed otherwise.
    Auto { reserve_bytes: usize },
    /// Every source in device memory: one read of each per child.
    Resident,
    /// Sources in pinned host memory, copied tensor by tensor while the previous one computes.
    Streamed,
}

impl TensorSources {
    /// `Σ rank_e`: the length of [`TensorCoefficients::c`].
    pub fn total_rank(&self) -> usize {
        self.factors.iter().map(|f| f.rank).sum()
    }

    /// Elements of the tensor.
    pub fn numel(&self) -> usize {
        self.m * self.n
    }

    /// Bytes the sources occupy where they are placed: the weights in their dtype plus the
    /// factors in f32.
    pub fn bytes(&self) -> usize {
        (1 + self.experts.len()) * self.numel() * self.base.dtype.size()
            + self.total_rank() * (self.m + self.n) * 4
    }

    /// The sources' own consistency (checked when they are placed, once per run).
    pub fn check(&self) -> Result<()> {
        let name = &self.name;
        let bad = |what: String| Err(Error::tensor(name, format!("materialize: {what}")));
        if self.base.numel() != self.numel() {
            return bad(format!(
                "base has {} elements, not {}×{}",
                self.base.numel(),
                self.m,
                self.n
            ));
        }
        if let Some(x) = self
            .experts
            .iter()
            .find(|x| x.numel() != self.numel() || x.dtype != self.base.dtype)
        {
            return bad(format!(
                "an expert is {} {:?}, the base {} {:?}",
                x.dtype, x.shape, self.base.dtype, self.base.shape
            ));
        }
        if !self.factors.is_empty() && self.factors.len() != self.experts.len() {
            return bad(format!(
                "{} factor pairs for {} experts",
                self.factors.len(),
                self.experts.len()
            ));
        }
        if let Some(f) = self
            .factors
            .iter()
            .find(|f| f.u.len() != self.m * f.rank || f.vt.len() != f.rank * self.n)
        {
            return bad(format!(
                "factors of rank {} hold {} and {} values for a {}×{} tensor",
                f.rank,
                f.u.len(),
                f.vt.len(),
                self.m,
                self.n
            ));
        }
        Ok(())
    }

    /// One call's arguments: an output of `out_len` bytes of `out_dtype` and coefficients that
    /// match the sources.
    pub fn check_call(
        &self,
        out_len: usize,
        out_dtype: DType,
        coef: &TensorCoefficients,
    ) -> Result<()> {
        let bad = |what: String| Err(Error::tensor(&self.name, format!("materialize: {what}")));
        if out_len != self.numel() * out_dtype.size() {
            return bad(format!(
                "output of {out_len} bytes for a {}×{} tensor of {out_dtype}",
                self.m, self.n
            ));
        }
        if coef.a.len() != self.experts.len() || coef.c.len() != self.total_rank() {
            return bad(format!(
                "{} expert and {} low-rank coefficients for {} experts of total rank {}",
                coef.a.len(),
                coef.c.len(),
                self.experts.len(),
                self.total_rank()
            ));
        }
        Ok(())
    }
}

/// A whole-model materialisation's counts agree: one output and one coefficient set per placed
/// tensor.
pub fn check_counts(outs: usize, coefs: usize, placed: usize) -> Result<()> {
    if outs != placed || coefs != placed {
        return Err(Error::invalid(format!(
            "materialize: {outs} outputs and {coefs} coefficient sets for {placed} placed tensors"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sources(m: usize, n: usize, r: usize) -> TensorSources {
        let t = |v: f32| HostTensor::from_f32(&vec![v; m * n], vec![m, n], DType::F32);
        let f = LowRankFactors {
            u: vec![0.0; m * r].into(),
            vt: vec![0.0; r * n].into(),
            rank: r,
        };
        TensorSources {
            name: "w".into(),
            base: t(0.0),
            experts: vec![t(1.0), t(2.0)],
            factors: vec![f.clone(), f],
            m,
            n,
        }
    }

    #[test]
    fn checks_name_the_tensor_and_the_mismatch() {
        let s = sources(3, 4, 2);
        s.check().unwrap();
        assert_eq!(s.total_rank(), 4);
        assert_eq!(s.bytes(), 3 * 12 * 4 + 4 * 7 * 4);
        let good = TensorCoefficients {
            a: vec![0.5, 0.5],
            c: vec![0.0; 4],
        };
        s.check_call(48, DType::F32, &good).unwrap();
        let e = s.check_call(47, DType::F32, &good).unwrap_err().to_string();
        assert!(e.contains("`w`") && e.contains("47 bytes"), "{e}");
        let short = TensorCoefficients {
            a: vec![0.5],
            c: vec![0.0; 4],
        };
        assert!(s.check_call(48, DType::F32, &short).is_err());
        let mut wrong = s.clone();
        wrong.factors[1].rank = 3;
        assert!(wrong.check().unwrap_err().to_string().contains("rank 3"));
        let mut odd = s;
        odd.experts[0] = HostTensor::from_f32(&[0.0; 12], vec![3, 4], DType::BF16);
        assert!(odd.check().is_err());
    }
}
