//! `cycleqd-engine bench [--shape tiny|llama3-8b] [--device cpu|cuda|cuda:N] [--json]`: the
//! device's measured ceilings, then every hot operation timed against them. The `llama3-8b`
//! shape is generated on the device (random weights, no files); on a CPU, `tiny` is the default.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use serde_json::{json, Value};

use cycleqd_engine::backend::cpu::{CpuBackend, Isa, Precision};
use cycleqd_engine::backend::cuda::{
    cuda_unavailable_reason, CudaBackend, DeviceChoice, DeviceInfo,
};
use cycleqd_engine::backend::Backend;
use cycleqd_engine::bench::suite::{self, Ceilings, OpResult};
use cycleqd_engine::bench::{cpu_copy_bandwidth, cpu_peak_bf16_flops, cpu_peak_flops};
use cycleqd_engine::durable::write_atomic;
use cycleqd_engine::model::{DType, LlamaConfig};
use cycleqd_engine::synth::LlamaShape;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Shape {
    Tiny,
    /// The ~100M-parameter shape of `cargo bench --bench llama_cpu` (a CPU's evaluation
    /// workload: 64 prompts × 32 new tokens).
    #[value(name = "100m")]
    Small100m,
    #[value(name = "llama3-8b")]
    Llama3_8b,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Op {
    /// The device's ceilings and every hot operation (the default).
    Device,
    /// The coordinator driving simulated devices: busy fractions and time per child.
    Scheduler,
    /// The synthetic demo's loop on real CPU or GPU workers: children per second.
    Demo,
    /// The code-execution sandbox: its start-up overhead per program, programs per second.
    Sandbox,
    /// The demo with full evaluation against racing: examples scored, time, final scores.
    Racing,
    /// The OpenAI endpoint: tokens/s at several concurrent clients against one batched
    /// `generate`.
    Serve,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum ServeModel {
    /// The synthetic demo's base.
    Demo,
    /// A random Llama of about 100M parameters with a word-level tokenizer.
    #[value(name = "100m")]
    Small100m,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum ScheduleArg {
    Batch,
    Steady,
    Both,
}

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// What to measure.
    #[arg(long, value_enum, default_value = "device")]
    op: Op,
    /// Workers (`scheduler`: simulated devices; `demo`: CPU workers, or one per GPU).
    #[arg(long, default_value_t = 1)]
    workers: usize,
    /// `scheduler`: how long each simulated device holds a child, in milliseconds.
    #[arg(long, default_value_t = 20.0)]
    child_ms: f64,
    /// `scheduler`: children to run (default 50 per worker, at least 400).
    #[arg(long)]
    children: Option<u64>,
    /// `scheduler`: which schedules (batch of one child per worker, steady, or both).
    #[arg(long, value_enum, default_value = "both")]
    schedule: ScheduleArg,
    /// Model shape (default: tiny on a CPU, llama3-8b on CUDA).
    #[arg(long, value_enum)]
    shape: Option<Shape>,
    /// cpu, cuda or cuda:N (default: CUDA when present).
    #[arg(long)]
    device: Option<DeviceChoice>,
    /// `racing`: the demo seeds to compare on.
    #[arg(long, value_delimiter = ',', default_value = "0,1,2")]
    seeds: Vec<u64>,
    /// `racing`: fitness prompts per subject of the synthesised demo (8 subjects a task).
    #[arg(long, default_value_t = 12)]
    fitness_per_subject: usize,
    /// `racing`: the rounds' growth (`evolution.racing_growth`; default: the config's).
    #[arg(long)]
    racing_growth: Option<f64>,
    /// `scheduler`: worker processes through this Redis instead of threads in this process.
    #[arg(long)]
    broker: Option<cycleqd_engine::broker::BrokerUrl>,
    /// `serve`: concurrent clients to measure at.
    #[arg(long, value_delimiter = ',', default_value = "1,16,64")]
    clients: Vec<usize>,
    /// `serve`: the models to serve.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "demo,100m")]
    serve_models: Vec<ServeModel>,
    /// Print the JSON report instead of the table.
    #[arg(long)]
    json: bool,
    /// Also write the JSON report to this file.
    #[arg(long)]
    out: Option<PathBuf>,
}

/// Sizes of each timed workload for a shape.
struct Plan {
    shape: LlamaShape,
    rank: usize,
    experts: usize,
    decode_context: usize,
    decode_steps: usize,
    prefill: (usize, usize),
    eval: (usize, usize, usize),
}

impl Plan {
    fn new(shape: Shape) -> Plan {
        match shape {
            Shape::Tiny => Plan {
                shape: LlamaShape::TINY,
                rank: 16,
                experts: 3,
                decode_context: 64,
                decode_steps: 16,
                prefill: (8, 128),
                eval: (64, 32, 16),
            },
            Shape::Small100m => Plan {
                shape: LlamaShape::SMALL_100M,
                rank: 64,
                experts: 3,
                decode_context: 32,
                decode_steps: 16,
                prefill: (16, 32),
                eval: (64, 32, 32),
            },
            Shape::Llama3_8b => Plan {
                shape: LlamaShape::LLAMA3_8B,
                rank: 256,
                experts: 3,
                decode_context: 128,
                decode_steps: 32,
                prefill: (8, 512),
                eval: (256, 64, 32),
            },
        }
    }
}

pub fn run(a: BenchArgs) -> anyhow::Result<ExitCode> {
    match a.op {
        Op::Device => {}
        Op::Scheduler => return scheduler(&a),
        Op::Demo => return demo(&a),
        Op::Sandbox => return sandbox(&a),
        Op::Racing => return racing(&a),
        Op::Serve => return serve(&a),
    }
    let choice = a.device.unwrap_or(match cuda_unavailable_reason() {
        None => DeviceChoice::Cuda(None),
        Some(_) => DeviceChoice::Cpu,
    });
    let dtype = DType::BF16;
    let report = match choice {
        DeviceChoice::Cpu => {
            let shape = a.shape.unwrap_or(Shape::Tiny);
            let plan = Plan::new(shape);
            let cfg = plan.shape.config(dtype)?;
            check_cpu_room(shape, &cfg, dtype, &plan)?;
            let be = CpuBackend;
            progress("measuring ceilings");
            let isa = Isa::current()?;
            let ceil = Ceilings {
                copy_bytes_per_s: cpu_copy_bandwidth(512 << 20),
                flops_per_s: cpu_peak_flops(),
                flops_kind: format!("f32 FMA ({})", isa.name()),
            };
            // The Llama matmuls' ceiling is the arithmetic they run: bf16 dot products when
            // the precision setting computes bf16 weights in bf16 on this CPU (materialise
            // and factorise stay f32).
            let matmul_ceil = match Precision::current()
                .uses_bf16(dtype, isa)
                .then(cpu_peak_bf16_flops)
                .flatten()
            {
                Some(peak) => Ceilings {
                    copy_bytes_per_s: ceil.copy_bytes_per_s,
                    flops_per_s: peak,
                    flops_kind: if isa == Isa::AmxBf16 {
                        "bf16 tiles (tdpbf16ps, amxbf16)".into()
                    } else {
                        format!("bf16 dot product (vdpbf16ps, {})", isa.name())
                    },
                },
                None => ceil.clone(),
            };
            let mut ops = vec![];
            progress("materialize");
            ops.push(suite::materialize_host(
                &be,
                &cfg,
                dtype,
                plan.experts,
                plan.rank,
                &ceil,
            )?);
            progress("factorize");
            ops.push(suite::factorize_cpu(&cfg, plan.rank, &ceil)?);
            ops.extend(inference(&be, &cfg, dtype, &plan, &matmul_ceil)?);
            let device = format!("{} — {}", be.name(), cpu_model());
            report_json(&device, None, &cfg, &plan, &ceil, ops, vec![])
        }
        DeviceChoice::Cuda(ordinal) => {
            if let Some(why) = cuda_unavailable_reason() {
                bail!("--device cuda: CUDA is unavailable: {why}");
            }
            let plan = Plan::new(a.shape.unwrap_or(Shape::Llama3_8b));
            let ordinal = ordinal.unwrap_or(0);
            let be = CudaBackend::open(ordinal).context("opening the CUDA device")?;
            progress("measuring ceilings");
            let ceil = cycleqd_engine::bench::cuda::ceilings(&be)?;
            let cfg = plan.shape.config(dtype)?;
            let mut ops = vec![];
            progress("materialize (resident, streamed)");
            ops.extend(cycleqd_engine::bench::cuda::materialize_modes(
                &be,
                &cfg,
                dtype,
                plan.experts,
                plan.rank,
                2,
                &ceil,
            )?);
            progress("factorize");
            ops.push(cycleqd_engine::bench::cuda::factorize(
                &be, &cfg, plan.rank, &ceil,
            )?);
            ops.extend(inference(&be, &cfg, dtype, &plan, &ceil)?);
            let owed: Vec<Value> = vec![];
            report_json(
                &be.name(),
                Some(DeviceInfo::query(ordinal)),
                &cfg,
                &plan,
                &ceil,
                ops,
                owed,
            )
            .map(|mut r| {
                r["kernels"] = json!(be.kernel_sources());
                r
            })
        }
    }?;
    if let Some(p) = &a.out {
        let text = serde_json::to_string_pretty(&report)?;
        write_atomic(p, text.as_bytes()).with_context(|| format!("writing {}", p.display()))?;
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_table(&report);
    }
    Ok(ExitCode::SUCCESS)
}

/// The CPU's model name (Linux), so a committed report names its machine.
fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

fn progress(what: &str) {
    eprintln!("bench: {what}…");
}

/// Decode at batch 1, 64 and 256, prefill, one decode step's attention at the evaluation
/// workload's batch and context, and that workload (plus the materialisation measured before
/// it: one full generation step of the loop).
fn inference<B: Backend>(
    be: &B,
    cfg: &LlamaConfig,
    dtype: DType,
    plan: &Plan,
    ceil: &Ceilings,
) -> anyhow::Result<Vec<OpResult>>
where
    B::Buf: Default,
{
    progress("building the random-weight model");
    let (model, bytes) = suite::random_model(be, cfg, dtype, 42)?;
    eprintln!("bench: model of {:.2} GB", bytes as f64 / 1e9);
    let mut ops = vec![];
    for batch in [1, 64, 256] {
        progress(&format!("decode batch {batch}"));
        ops.push(suite::decode(
            be,
            &model,
            dtype,
            batch,
            plan.decode_context,
            plan.decode_steps,
            ceil,
        )?);
    }
    progress("prefill");
    ops.push(suite::prefill_rate(
        be,
        &model,
        plan.prefill.0,
        plan.prefill.1,
        ceil,
    )?);
    let (p, len, new) = plan.eval;
    progress("attention");
    ops.push(suite::attention(be, &model, p, len + new, ceil)?);
    progress("evaluation workload");
    ops.push(suite::evaluation(be, &model, dtype, p, len, new, ceil)?);
    Ok(ops)
}

/// What the CPU bench of `plan` holds at its peak: the random model's weights, then the
/// largest of its workloads' KV caches (counted in f32, the wider of a cache's dtypes) and
/// logits (the materialise and factorise steps before them hold one layer's tensors, far
/// less). Refused in one line when the machine has less available, instead of being killed
/// for memory half-way.
fn check_cpu_room(
    shape: Shape,
    cfg: &LlamaConfig,
    dtype: DType,
    plan: &Plan,
) -> anyhow::Result<()> {
    let weights = (cfg.num_parameters() * dtype.size()) as f64;
    let kv_width = cfg.num_key_value_heads * cfg.head_dim;
    let decode_seq = plan.decode_context + plan.decode_steps;
    let workloads = [
        (256, decode_seq),
        (plan.prefill.0, plan.prefill.1),
        (plan.eval.0, plan.eval.1 + plan.eval.2),
    ];
    let (kv, logits) = workloads
        .iter()
        .map(|&(slots, seq)| {
            let kv = (slots * seq * kv_width * 8 * cfg.num_hidden_layers) as f64;
            (kv, (slots * cfg.vocab_size * 4) as f64)
        })
        .fold((0.0f64, 0.0f64), |(a, b), (kv, lg)| {
            if kv + lg > a + b {
                (kv, lg)
            } else {
                (a, b)
            }
        });
    let need = weights + kv + logits;
    if let Some(avail) = cycleqd_engine::backend::cpu::available_memory() {
        if need > avail as f64 {
            let name = shape
                .to_possible_value()
                .map_or("?".into(), |v| v.get_name().to_string());
            bail!(
                "bench --shape {name} on the CPU needs about {:.1} GB (weights {:.1} GB, KV cache \
                 and logits {:.1} GB) and {:.1} GB of memory is available; try --shape tiny",
                need / 1e9,
                weights / 1e9,
                (kv + logits) / 1e9,
                avail as f64 / 1e9
            );
        }
    }
    Ok(())
}

fn report_json(
    device: &str,
    info: Option<DeviceInfo>,
    cfg: &LlamaConfig,
    plan: &Plan,
    ceil: &Ceilings,
    ops: Vec<OpResult>,
    owed: Vec<Value>,
) -> anyhow::Result<Value> {
    Ok(json!({
        "engine": env!("CARGO_PKG_VERSION"),
        "device": device,
        "nvml": info,
        "shape": {
            "hidden_size": cfg.hidden_size, "layers": cfg.num_hidden_layers,
            "heads": cfg.num_attention_heads, "kv_heads": cfg.num_key_value_heads,
            "intermediate_size": cfg.intermediate_size, "vocab_size": cfg.vocab_size,
            "rank": plan.rank, "experts": plan.experts,
        },
        "dtype": "bf16",
        "ceilings": ceil,
        "ops": ops,
        "not_measured": owed,
    }))
}

fn print_table(r: &Value) {
    println!("device: {}", r["device"].as_str().unwrap_or("?"));
    let c = &r["ceilings"];
    println!(
        "ceilings: copy {:.1} GB/s, {} {:.2} TFLOP/s",
        c["copy_bytes_per_s"].as_f64().unwrap_or(0.0) / 1e9,
        c["flops_kind"].as_str().unwrap_or(""),
        c["flops_per_s"].as_f64().unwrap_or(0.0) / 1e12
    );
    println!(
        "{:<36} {:>10} {:>14} {:>9}  bound by",
        "op", "time", "rate", "fraction"
    );
    for op in r["ops"].as_array().into_iter().flatten() {
        let frac = op["fraction_of_ceiling"].as_f64();
        println!(
            "{:<36} {:>9.4}s {:>10.2} {:<5} {:>8}  {}",
            op["op"].as_str().unwrap_or(""),
            op["seconds"].as_f64().unwrap_or(0.0),
            op["rate"].as_f64().unwrap_or(0.0),
            op["unit"].as_str().unwrap_or(""),
            frac.map_or("—".to_string(), |f| format!("{:.1}%", 100.0 * f)),
            op["bound_by"].as_str().unwrap_or("")
        );
    }
    for o in r["not_measured"].as_array().into_iter().flatten() {
        println!(
            "not measured: {}: {}",
            o["op"].as_str().unwrap_or(""),
            o["status"].as_str().unwrap_or("")
        );
    }
}

/// Writes the report (`--out`), then prints it as JSON or with `table`.
fn emit(a: &BenchArgs, report: &Value, table: impl Fn(&Value)) -> anyhow::Result<ExitCode> {
    if let Some(p) = &a.out {
        let text = serde_json::to_string_pretty(report)?;
        write_atomic(p, text.as_bytes()).with_context(|| format!("writing {}", p.display()))?;
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(report)?);
    } else {
        table(report);
    }
    Ok(ExitCode::SUCCESS)
}

fn scheduler(a: &BenchArgs) -> anyhow::Result<ExitCode> {
    use cycleqd_engine::bench::scheduler::{demo_set, measure};
    use cycleqd_engine::run::Schedule;
    if a.workers == 0 || !(a.child_ms >= 0.0 && a.child_ms.is_finite()) {
        bail!("--workers must be at least 1 and --child-ms a time ≥ 0");
    }
    let scratch = std::env::temp_dir().join("cycleqd-bench");
    progress("the demo's expert set");
    let set = std::sync::Arc::new(demo_set(&scratch.join("demo"))?);
    let children = a.children.unwrap_or((50 * a.workers as u64).max(400));
    let schedules = match a.schedule {
        ScheduleArg::Batch => vec![Schedule::Batch(a.workers)],
        ScheduleArg::Steady => vec![Schedule::Steady],
        ScheduleArg::Both => vec![Schedule::Batch(a.workers), Schedule::Steady],
    };
    // Three runs each, the median kept: a machine's scheduling noise (a VM's above all) is
    // of the same order as what is measured.
    let mut results = vec![];
    for s in schedules {
        progress(&format!(
            "{s:?} with {} simulated workers (3 runs)",
            a.workers
        ));
        let mut runs = (0..3)
            .map(|_| match &a.broker {
                None => measure(set.clone(), &scratch, a.workers, a.child_ms, s, children),
                Some(url) => cycleqd_engine::bench::scheduler::measure_broker(
                    url,
                    &std::env::current_exe()
                        .map_err(|e| cycleqd_engine::Error::invalid(e.to_string()))?,
                    &scratch.join("demo"),
                    set.clone(),
                    &scratch,
                    a.workers,
                    a.child_ms,
                    s,
                    children,
                ),
            })
            .collect::<cycleqd_engine::Result<Vec<_>>>()?;
        runs.sort_by(|x, y| {
            x["busy_fraction_mean"]
                .as_f64()
                .partial_cmp(&y["busy_fraction_mean"].as_f64())
                .expect("finite fractions")
        });
        let mut median = runs[1].clone();
        median["busy_fraction_mean_of_runs"] = json!(runs
            .iter()
            .map(|r| r["busy_fraction_mean"].clone())
            .collect::<Vec<_>>());
        results.push(median);
    }
    let report = json!({
        "op": "scheduler",
        "machine": cpu_model(),
        "broker": a.broker.as_ref().map(|u| u.to_string()),
        "checkpoint_every": 25,
        "results": results,
    });
    emit(a, &report, |r| {
        println!(
            "{:<10} {:>7} {:>8} {:>9} {:>10} {:>10} {:>14}",
            "schedule",
            "workers",
            "child ms",
            "children",
            "busy min",
            "busy mean",
            if r["broker"].is_null() {
                "coord ms/child"
            } else {
                "broker ms (med)"
            }
        );
        for x in r["results"].as_array().into_iter().flatten() {
            println!(
                "{:<10} {:>7} {:>8.1} {:>9} {:>9.1}% {:>9.1}% {:>14.3}",
                x["schedule"].as_str().unwrap_or(""),
                x["workers"],
                x["child_ms"].as_f64().unwrap_or(0.0),
                x["children"],
                100.0 * x["busy_fraction_min"].as_f64().unwrap_or(0.0),
                100.0 * x["busy_fraction_mean"].as_f64().unwrap_or(0.0),
                x["coordinator_ms_per_child"]
                    .as_f64()
                    .or(x["broker_latency_ms_median"].as_f64())
                    .unwrap_or(0.0),
            );
        }
    })
}

/// The demo's loop with `--workers` workers on `--device`, in a scratch folder: children per
/// second of the loop (the final table is not timed).
fn demo(a: &BenchArgs) -> anyhow::Result<ExitCode> {
    use cycleqd_engine::qd::RunConfig;
    use cycleqd_engine::run::{plan_workers, Quiet, Run, RunEnd, Stop};
    let scratch = std::env::temp_dir().join(format!("cycleqd-bench-demo-{}", std::process::id()));
    let demo_dir = scratch.join("demo");
    progress("synthesising the demo");
    cycleqd_engine::synth::synthesize(&demo_dir, &cycleqd_engine::synth::SynthOptions::default())?;
    let mut cfg = RunConfig::load(&demo_dir.join("cycleqd.toml"))?;
    if let Some(c) = a.children {
        cfg.evolution.generations = c;
    }
    let devices = plan_workers(Some(a.workers), a.device)?;
    let device_names: Vec<String> = devices.iter().map(|d| d.to_string()).collect();
    progress(&format!("the demo's loop on {}", device_names.join(", ")));
    let out = scratch.join("run");
    let mut run = Run::open(cfg, &out, devices, &mut Quiet)?;
    let schedule = format!("{:?}", run.schedule());
    let end = run.execute(&Stop::default(), &mut Quiet)?;
    let RunEnd::Finished(_) = end else {
        bail!("the demo run did not finish");
    };
    let summary: Value = serde_json::from_slice(&std::fs::read(out.join("summary.json"))?)?;
    let _ = std::fs::remove_dir_all(&scratch);
    let t = &summary["timing"];
    let report = json!({
        "op": "demo",
        "machine": cpu_model(),
        "devices": device_names,
        "schedule": schedule,
        "children": t["children_this_session"],
        "loop_seconds": t["loop_seconds_this_session"],
        "children_per_second": t["children_per_second"],
    });
    emit(a, &report, |r| {
        println!(
            "demo loop: {} children in {:.2} s = {:.1} children/s on {} ({})",
            r["children"],
            r["loop_seconds"].as_f64().unwrap_or(0.0),
            r["children_per_second"].as_f64().unwrap_or(0.0),
            r["devices"],
            r["schedule"].as_str().unwrap_or("")
        );
    })
}

/// The sandbox of `python_tests`: start-up overhead and programs per second on every core.
fn sandbox(a: &BenchArgs) -> anyhow::Result<ExitCode> {
    progress("the code-execution sandbox (50 starts each way, then 200 programs)");
    let mut report =
        cycleqd_engine::bench::sandbox::measure("python3", 50, a.children.unwrap_or(200) as usize)?;
    report["machine"] = json!(cpu_model());
    emit(a, &report, |r| {
        println!("{}", r["enforced"].as_str().unwrap_or(""));
        println!(
            "start of a trivial program: {:.1} ms plain, {:.1} ms sandboxed: {:.1} ms overhead",
            r["plain_start_ms"].as_f64().unwrap_or(0.0),
            r["sandboxed_start_ms"].as_f64().unwrap_or(0.0),
            r["overhead_ms"].as_f64().unwrap_or(0.0)
        );
        println!(
            "{} programs on {} threads: {:.1} programs/s sandboxed, {:.1} plain",
            r["programs"],
            r["threads"],
            r["programs_per_second"].as_f64().unwrap_or(0.0),
            r["programs_per_second_plain"].as_f64().unwrap_or(0.0)
        );
    })
}

/// Full evaluation against racing on the demo of several seeds.
fn racing(a: &BenchArgs) -> anyhow::Result<ExitCode> {
    progress(&format!(
        "the demo with full evaluation and with racing, seeds {:?}, {} fitness examples per task",
        a.seeds,
        8 * a.fitness_per_subject
    ));
    let scratch = std::env::temp_dir().join("cycleqd-bench");
    let mut report = cycleqd_engine::bench::racing::compare(
        &scratch,
        &a.seeds,
        a.fitness_per_subject,
        a.children,
        a.racing_growth,
    )?;
    report["machine"] = json!(cpu_model());
    emit(a, &report, |r| {
        println!(
            "{:>4} {:>9} {:>14} {:>14} {:>7} {:>8} {:>9} {:>9} {:>10}",
            "seed",
            "examples",
            "scored full",
            "scored racing",
            "ratio",
            "stopped",
            "s full",
            "s racing",
            "Δ held-out"
        );
        for x in r["results"].as_array().into_iter().flatten() {
            println!(
                "{:>4} {:>9} {:>14} {:>14} {:>6.2}× {:>8} {:>9.1} {:>9.1} {:>+10.3}",
                x["seed"],
                x["fitness_examples_per_task"],
                x["full"]["examples_scored"],
                x["racing"]["examples_scored"],
                x["examples_ratio"].as_f64().unwrap_or(0.0),
                x["racing"]["stopped_early"],
                x["full"]["loop_seconds"].as_f64().unwrap_or(0.0),
                x["racing"]["loop_seconds"].as_f64().unwrap_or(0.0),
                x["heldout_mean_difference"].as_f64().unwrap_or(0.0),
            );
        }
    })
}

/// The OpenAI endpoint against one batched `generate`, on each `--serve-models` model.
fn serve(a: &BenchArgs) -> anyhow::Result<ExitCode> {
    if a.clients.is_empty() || a.clients.contains(&0) {
        bail!("--clients must be numbers of clients, each at least 1");
    }
    match super::open_device(a.device)? {
        Some(gpu) => serve_on(&gpu, a),
        None => serve_on(&CpuBackend, a),
    }
}

fn serve_on<B: Backend>(be: &B, a: &BenchArgs) -> anyhow::Result<ExitCode>
where
    B::Buf: Default,
{
    use cycleqd_engine::bench::serve::{measure, ServeWorkload};
    use cycleqd_engine::llama::LlamaModel;
    use cycleqd_engine::model::{ModelStore, Tokenizer};
    let scratch = std::env::temp_dir().join(format!("cycleqd-bench-serve-{}", std::process::id()));
    let mut models = vec![];
    for m in &a.serve_models {
        let (name, model, tokenizer, workload) = match m {
            ServeModel::Demo => {
                progress("synthesising the demo");
                let dir = scratch.join("demo");
                cycleqd_engine::synth::synthesize(
                    &dir,
                    &cycleqd_engine::synth::SynthOptions::default(),
                )?;
                let store = ModelStore::open_llama(dir.join("base"))?;
                let model = LlamaModel::load(be, &store)?;
                let tok = Tokenizer::from_dir(&dir.join("base"))?;
                let w = ServeWorkload {
                    prompt_tokens: 16,
                    new_tokens: 32,
                    rounds: 25,
                };
                ("demo base", model, tok, w)
            }
            ServeModel::Small100m => {
                progress("a random ~100M Llama");
                let shape = LlamaShape::SMALL_100M;
                let (cfg, tensors) = cycleqd_engine::synth::random_llama(&shape, DType::BF16, 7)?;
                let dir = scratch.join("100m");
                std::fs::create_dir_all(&dir)?;
                let words: Vec<String> = ["<s>", "</s>", "<unk>"]
                    .iter()
                    .map(|w| w.to_string())
                    .chain((3..shape.vocab_size).map(|i| format!("w{i}")))
                    .collect();
                let tok_json = cycleqd_engine::synth::word_level_tokenizer_json(&words);
                write_atomic(&dir.join("tokenizer.json"), tok_json.to_string().as_bytes())?;
                let tok = Tokenizer::from_dir(&dir)?;
                let by_name: std::collections::HashMap<_, _> = tensors.into_iter().collect();
                let model = LlamaModel::from_tensors(be, cfg, |n| {
                    by_name
                        .get(n)
                        .cloned()
                        .ok_or_else(|| cycleqd_engine::Error::invalid(format!("no tensor {n}")))
                })?;
                let w = ServeWorkload {
                    prompt_tokens: 32,
                    new_tokens: 64,
                    rounds: 3,
                };
                ("random 100M", model, tok, w)
            }
        };
        let parameters = model.config.num_parameters();
        progress(&format!(
            "{name} ({:.1}M parameters): clients {:?}",
            parameters as f64 / 1e6,
            a.clients
        ));
        let rows = measure(be, &model, &tokenizer, &a.clients, workload)?;
        models.push(json!({"model": name, "parameters": parameters, "results": rows}));
    }
    let _ = std::fs::remove_dir_all(&scratch);
    let report = json!({
        "op": "serve",
        "machine": cpu_model(),
        "device": be.name(),
        "target": "at 16 clients, serve ≥ 80% of generate's batched tokens/s",
        "models": models,
    });
    emit(a, &report, |r| {
        println!(
            "{:<12} {:>7} {:>14} {:>14} {:>9} {:>10}",
            "model", "clients", "generate tok/s", "serve tok/s", "fraction", "same text"
        );
        for m in r["models"].as_array().into_iter().flatten() {
            for x in m["results"].as_array().into_iter().flatten() {
                println!(
                    "{:<12} {:>7} {:>14.1} {:>14.1} {:>8.1}% {:>10}",
                    m["model"].as_str().unwrap_or(""),
                    x["clients"],
                    x["generate_tokens_per_s"].as_f64().unwrap_or(0.0),
                    x["serve_tokens_per_s"].as_f64().unwrap_or(0.0),
                    100.0 * x["fraction_of_batched"].as_f64().unwrap_or(0.0),
                    x["same_text_as_generate"]
                );
            }
        }
    })
}
