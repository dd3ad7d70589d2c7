//! The CUDA-only parts of `bench`: the device's ceilings (device-to-device copy bandwidth and
//! the bf16 GEMM rate of cuBLAS) and materialisation in its resident and streamed modes.

use std::time::Instant;

use serde_json::json;

use super::suite::{materialize_result, time_synced, Ceilings, OpResult};
use crate::backend::cuda::{CudaBackend, CudaWeight};
use crate::backend::Backend;
use crate::backend::{LowRankFactors, TensorCoefficients, TensorSources};
use crate::error::{Error, Result};
use crate::model::{DType, HostTensor, LlamaConfig};
use crate::synth::hash_values;

/// Copy bandwidth (bytes read + written per second) of a 2 GiB device-to-device copy, and the
/// bf16 GEMM rate of an 8192³ product (f32 accumulate).
pub fn ceilings(be: &CudaBackend) -> Result<Ceilings> {
    let len = 2usize << 30;
    let src = be.random_weight(&[len / 2], DType::F16, 1, 1.0)?;
    let mut dst = be.random_weight(&[len / 2], DType::F16, 2, 1.0)?;
    let stream = be.stream().clone();
    let secs = time_synced(be, 10, || {
        stream
            .memcpy_dtod(&src.data, &mut dst.data)
            .map_err(|e| Error::invalid(format!("CUDA copy: {e}")))
    })?;
    let copy = 2.0 * (len as f64) / secs;

    let n = 8192;
    let a = be.random_weight(&[n, n], DType::BF16, 3, 0.1)?;
    let b = be.random_weight(&[n, n], DType::BF16, 4, 0.1)?;
    let mut c = be.zeros(n * n)?;
    let secs = time_synced(be, 10, || be.gemm_ceiling(&mut c, &a, &b, n))?;
    Ok(Ceilings {
        copy_bytes_per_s: copy,
        flops_per_s: 2.0 * (n as f64).powi(3) / secs,
        flops_kind: "bf16 tensor-core GEMM (cuBLAS, f32 accumulate)".into(),
    })
}

/// Resident materialisation over as many of `cfg`'s layers as fit in device memory (sources
/// generated on the device), then streamed materialisation over `stream_layers` layers from
/// pinned host memory.
pub fn materialize_modes(
    be: &CudaBackend,
    cfg: &LlamaConfig,
    dtype: DType,
    experts: usize,
    rank: usize,
    stream_layers: usize,
    ceil: &Ceilings,
) -> Result<Vec<OpResult>> {
    let layer: Vec<(usize, usize)> = cfg
        .expected_tensors()
        .iter()
        .filter(|(n, s)| s.len() == 2 && n.starts_with("model.layers.0."))
        .map(|(_, s)| (s[0], s[1]))
        .collect();
    let layer_bytes: usize = layer.iter().map(|(m, n)| m * n * dtype.size()).sum();
    let factor_bytes: usize = layer
        .iter()
        .map(|(m, n)| experts * (m + n) * rank * 4)
        .sum();
    let (free, _) = be.memory()?;
    let per_layer = (experts + 2) * layer_bytes + factor_bytes;
    let layers = ((free / 10 * 7) / per_layer).clamp(1, cfg.num_hidden_layers);
    let mut out = vec![];

    let mut resident = vec![];
    let mut outs = vec![];
    for l in 0..layers {
        for (i, &(m, n)) in layer.iter().enumerate() {
            let seed = (l * 100 + i * 10) as u64;
            resident.push(be.random_resident(m, n, dtype, experts, rank, seed)?);
            outs.push(be.random_weight(&[m, n], dtype, seed + 9, 0.1)?);
        }
    }
    let a: Vec<f32> = (0..experts).map(|e| 0.3 + 0.1 * e as f32).collect();
    let coef = TensorCoefficients {
        a: a.clone(),
        c: vec![0.5f32; experts * rank],
    };
    let coefs = vec![coef; resident.len()];
    let mut sources = be.resident_sources(resident)?;
    let secs = time_synced(be, 5, || {
        let mut refs: Vec<&mut CudaWeight> = outs.iter_mut().collect();
        be.materialize_placed(&mut refs, &mut sources, &coefs)
    })?;
    let (bytes, flops) = traffic(&layer, layers, dtype, experts, rank);
    out.push(materialize_result(
        "materialize resident",
        secs,
        bytes,
        flops,
        ceil,
        json!({"layers": layers, "experts": experts, "rank": rank,
               "seconds_per_model_extrapolated": secs * cfg.num_hidden_layers as f64 / layers as f64}),
    ));
    drop(sources);

    let cpu = crate::backend::cpu::CpuBackend;
    let stream_layers = stream_layers.min(layers);
    let mut streamed = vec![];
    let t0 = Instant::now();
    for l in 0..stream_layers {
        for (i, &(m, n)) in layer.iter().enumerate() {
            let seed = (l * 100 + i * 10) as u64;
            let mut host: Vec<HostTensor> = (0..=experts)
                .map(|e| cpu.random_weight(&[m, n], dtype, seed + e as u64, 0.03))
                .collect::<Result<_>>()?;
            let base = host.remove(0);
            let factors = (0..experts)
                .map(|e| LowRankFactors {
                    u: hash_values(m * rank, seed + 50 + e as u64, 0.01).into(),
                    vt: hash_values(rank * n, seed + 70 + e as u64, 0.01).into(),
                    rank,
                })
                .collect();
            let src = TensorSources {
                name: format!("layer{l}.{i}"),
                base,
                experts: host,
                factors,
                m,
                n,
            };
            streamed.push(be.streamed_tensor(&src)?);
        }
    }
    let n_streamed = streamed.len();
    let mut sources = be.streamed_sources(streamed)?;
    let setup = t0.elapsed().as_secs_f64();
    let mut souts: Vec<_> = outs.drain(..n_streamed).collect();
    let scoefs = &coefs[..n_streamed];
    let secs = time_synced(be, 3, || {
        let mut refs: Vec<&mut CudaWeight> = souts.iter_mut().collect();
        be.materialize_placed(&mut refs, &mut sources, scoefs)
    })?;
    let (bytes, flops) = traffic(&layer, stream_layers, dtype, experts, rank);
    // Streamed mode is bound by the host link: report against it, as measured here.
    let mut r = materialize_result(
        "materialize streamed",
        secs,
        bytes,
        flops,
        ceil,
        json!({"layers": stream_layers, "setup_seconds": setup}),
    );
    let host_bytes = ((experts + 1) * layer_bytes * stream_layers) as f64;
    r.detail["host_to_device_gb_s"] = json!(host_bytes / secs / 1e9);
    out.push(r);
    Ok(out)
}

/// Bytes moved (sources read, output written, factors read) and low-rank FLOPs.
fn traffic(
    layer: &[(usize, usize)],
    layers: usize,
    dtype: DType,
    experts: usize,
    rank: usize,
) -> (f64, f64) {
    let (mut bytes, mut flops) = (0.0, 0.0);
    for &(m, n) in layer {
        bytes += ((experts + 2) * m * n * dtype.size() + experts * (m + n) * rank * 4) as f64;
        flops += 2.0 * (m * n * rank * experts) as f64;
    }
    (bytes * layers as f64, flops * layers as f64)
}

/// Randomized SVD (rank `rank`, the engine's oversampling and power iterations) of one task
/// vector per 2-D tensor of `cfg`, batched by shape on the GPU (host upload included, as the
/// engine's expert tensors live on the host), plus the error against the exact optimum on the
/// smallest shape.
pub fn factorize(
    be: &CudaBackend,
    cfg: &LlamaConfig,
    rank: usize,
    ceil: &Ceilings,
) -> Result<OpResult> {
    use crate::evolve::{exact_svd, RandomizedSvd};
    use rayon::prelude::*;
    use std::collections::BTreeMap;
    let mut by_shape: BTreeMap<(usize, usize), usize> = BTreeMap::new();
    for (_, s) in cfg.expected_tensors().iter().filter(|(_, s)| s.len() == 2) {
        *by_shape.entry((s[0], s[1])).or_default() += 1;
    }
    let opts = RandomizedSvd::default();
    // Uniform in [−0.5, 0.5): the same values as `hash_uniform − 0.5`.
    let noise = |m: usize, n: usize, seed: u64| hash_values(m * n, seed, 0.5);
    let (mut secs, mut flops, mut matrices) = (0.0, 0.0, 0);
    for (&(m, n), &count) in &by_shape {
        let r = rank.min(m).min(n);
        let l = (r + opts.oversample).min(m.min(n));
        // Batches of at most 2 GB of task vectors.
        let per_batch = ((2usize << 30) / (m * n * 4)).clamp(1, count);
        let mut done = 0;
        while done < count {
            let nb = per_batch.min(count - done);
            let mats: Vec<Vec<f32>> = (0..nb).map(|i| noise(m, n, (done + i) as u64)).collect();
            let refs: Vec<&[f32]> = mats.iter().map(|v| &v[..]).collect();
            let seeds: Vec<u64> = (0..nb as u64).collect();
            be.synchronize()?;
            let t = Instant::now();
            be.randomized_svd_batch(&refs, m, n, r, opts, &seeds)?;
            secs += t.elapsed().as_secs_f64();
            done += nb;
        }
        flops += count as f64 * 2.0 * (2 * opts.power_iters + 2) as f64 * (m * n * l) as f64;
        matrices += count;
    }
    // Accuracy on a decaying spectrum of the smallest shape.
    let (&(m, n), _) = by_shape
        .iter()
        .min_by_key(|((m, n), _)| m * n)
        .expect("a 2-D tensor");
    let k = 64.min(m).min(n);
    let u = noise(m, k, 7);
    let v = noise(n, k, 8);
    let a: Vec<f32> = (0..m * n)
        .into_par_iter()
        .map(|idx| {
            let (i, j) = (idx / n, idx % n);
            (0..k)
                .map(|t| u[i * k + t] * v[j * k + t] * 0.93f32.powi(t as i32))
                .sum::<f32>()
                + 1e-3 * (crate::synth::hash_uniform(9, idx as u64) - 0.5)
        })
        .collect();
    let r = rank.min(m).min(n);
    let gpu = be
        .randomized_svd_batch(&[&a], m, n, r, opts, &[0])?
        .remove(0);
    let exact = exact_svd(&a, m, n, r)?;
    Ok(OpResult {
        op: format!("factorize {matrices} matrices rank {rank}"),
        seconds: secs,
        rate: flops / secs / 1e12,
        unit: "TFLOP/s".into(),
        fraction_of_ceiling: flops / secs / ceil.flops_per_s,
        bound_by: "f32 GEMMs (cuBLAS) against the bf16 GEMM peak".into(),
        detail: json!({
            "matrices": matrices, "rank": rank, "includes_host_upload": true,
            "error_check": {"shape": [m, n], "randomized": gpu.relative_error(&a),
                            "optimal": exact.relative_error(&a),
                            "sigma0": [gpu.s[0], exact.s[0]]},
        }),
    })
}
