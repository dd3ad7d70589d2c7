//! Synthetic skills: a tiny random base Llama and K experts that really hold distinct skills
//! through the normal forward pass, for the demo and the tests. No training loop: each expert is
//! the base plus one closed-form ridge edit of the last layer's `down_proj`
//! (`ΔW = Rᵀ (K Kᵀ + λI)⁻¹ K`, keys `K` = the `down_proj` inputs at the prompts' last position,
//! targets `R` = residual-stream pushes toward each prompt's answer), as measured in
//! `shared/docs/synthetic-demo.md`.
//!
//! A skill maps each of its subject words to an answer word: the prompt `d1 subject d2 =`
//! (distractor words around the subject) must be answered by the subject's answer, so held-out
//! prompts (the same subjects with unseen distractor pairs) test the skill, not a memorised
//! prompt. The design keeps the ingredients the prototype found necessary for quality diversity
//! to matter:
//! - **interference**: the keys of all skills are dominated by the shared separator, so one
//!   expert's edit leaks into the others' prompts, and averaging experts dilutes every edit;
//! - **positive transfer**: the base answers a "junk" word on every prompt, and every expert's
//!   edit also partly suppresses it (a component all experts share);
//! - **headroom**: each edit's strength is the smallest giving ≥ 90% on its own fitness split,
//!   so scaling an expert's own singular directions (SVD mutation) can still improve it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rand::seq::IndexedRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use serde_json::{json, Value};

use super::random::{random_llama, LlamaShape};
use crate::backend::cpu::CpuBackend;
use crate::durable::write_synced;
use crate::error::{Error, Result};
use crate::eval::task::to_jsonl;
use crate::eval::{evaluate, Example, PreparedTask, Scoring, Target, TaskFile, TaskSettings};
use crate::llama::{LlamaModel, Probe, Step};
use crate::model::export::CheckpointWriter;
use crate::model::safetensors::TensorSpec;
use crate::model::{DType, HostTensor, LlamaConfig, Tokenizer};

/// Skill names, in order (K ≤ 6).
pub const SKILL_NAMES: &[&str] = &["alpha", "beta", "gamma", "delta", "epsilon", "zeta"];

/// What `synth` builds.
#[derive(Clone, Debug)]
pub struct SynthOptions {
    pub seed: u64,
    pub skills: usize,
    /// Subjects per skill.
    pub subjects: usize,
    /// Fitness prompts per subject (distinct distractor pairs).
    pub fitness_per_subject: usize,
    /// Held-out prompts per subject (distractor pairs not used for fitness).
    pub heldout_per_subject: usize,
    /// Own-task fitness score each expert's edit strength is tuned to reach.
    pub expert_target: f64,
}

impl Default for SynthOptions {
    fn default() -> Self {
        SynthOptions {
            seed: 0,
            skills: 3,
            subjects: 8,
            fitness_per_subject: 12,
            heldout_per_subject: 8,
            expert_target: 0.9,
        }
    }
}

/// The demo's model shape: about 100k parameters, so a child costs milliseconds on a CPU.
pub const DEMO_SHAPE: LlamaShape = LlamaShape {
    hidden_size: 64,
    num_hidden_layers: 2,
    num_attention_heads: 4,
    num_key_value_heads: 2,
    intermediate_size: 176,
    vocab_size: 256,
    max_position_embeddings: 64,
    tie_word_embeddings: false,
};

const ANSWERS: usize = 64;
const DISTRACTORS: usize = 32;
/// Share of each edit's push that goes to suppressing the junk word (vs. the answer).
const JUNK_SUPPRESSION: f32 = 0.5;
/// Margin by which the base prefers the junk word on its least sure prompt (logits).
const JUNK_MARGIN: f32 = 1.0;
/// Ridge strength relative to the mean squared key norm.
const RIDGE: f64 = 0.2;

/// Scores of one model on every skill, fitness and held-out.
#[derive(Clone, Debug, Serialize)]
pub struct ModelScores {
    pub model: String,
    pub fitness: Vec<f64>,
    pub heldout: Vec<f64>,
}

/// What `synth` measured, and whether the demo's requirements hold.
#[derive(Clone, Debug, Serialize)]
pub struct SynthReport {
    pub out: PathBuf,
    pub skills: Vec<String>,
    /// Each expert's edit strength (the smallest reaching the target on its own task).
    pub edit_strength: Vec<f32>,
    /// base, each expert, the equal-weight linear merge of the experts.
    pub scores: Vec<ModelScores>,
    /// Requirement → whether it holds.
    pub requirements: Vec<(String, bool)>,
}

struct Vocab {
    words: Vec<String>,
    index: BTreeMap<String, u32>,
}

impl Vocab {
    fn id(&self, w: &str) -> u32 {
        self.index[w]
    }
}

fn build_vocab(skills: usize, subjects: usize) -> Vocab {
    let mut words: Vec<String> = ["<s>", "</s>", "<unk>", "=", "junk"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    for name in &SKILL_NAMES[..skills] {
        words.extend((0..subjects).map(|i| format!("{name}{i:02}")));
    }
    words.extend((0..ANSWERS).map(|i| format!("a{i:02}")));
    words.extend((0..DISTRACTORS).map(|i| format!("d{i:02}")));
    let mut i = 0;
    while words.len() < DEMO_SHAPE.vocab_size {
        words.push(format!("w{i:03}"));
        i += 1;
    }
    let index = words
        .iter()
        .enumerate()
        .map(|(i, w)| (w.clone(), i as u32))
        .collect();
    Vocab { words, index }
}

fn tokenizer_json(v: &Vocab) -> Value {
    word_level_tokenizer_json(&v.words)
}

/// A word-level `tokenizer.json` over `words` (ids in order; 0, 1 and 2 are `<s>`, `</s>` and
/// `<unk>`), whitespace split with `<s>` prepended, that transformers loads as a
/// `PreTrainedTokenizerFast`.
pub fn word_level_tokenizer_json(words: &[String]) -> Value {
    let special = |id: usize, content: &str| {
        json!({"id": id, "content": content, "single_word": false, "lstrip": false,
               "rstrip": false, "normalized": false, "special": true})
    };
    let vocab: serde_json::Map<String, Value> = words
        .iter()
        .enumerate()
        .map(|(i, w)| (w.clone(), json!(i)))
        .collect();
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [special(0, "<s>"), special(1, "</s>"), special(2, "<unk>")],
        "normalizer": null,
        "pre_tokenizer": {"type": "WhitespaceSplit"},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                       {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                     {"Sequence": {"id": "A", "type_id": 0}},
                     {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [0], "tokens": ["<s>"]}}
        },
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}
    })
}

fn tokenizer_config_json() -> Value {
    json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "model_max_length": DEMO_SHAPE.max_position_embeddings,
        "clean_up_tokenization_spaces": false
    })
}

/// One skill's examples.
struct Skill {
    name: String,
    fitness: Vec<Example>,
    heldout: Vec<Example>,
}

fn build_skills(opts: &SynthOptions, rng: &mut ChaCha8Rng) -> Vec<Skill> {
    let per = opts.fitness_per_subject + opts.heldout_per_subject;
    // Every distractor pair (d1 ≠ d2); each subject gets its own random selection.
    let pairs: Vec<(usize, usize)> = (0..DISTRACTORS)
        .flat_map(|a| {
            (0..DISTRACTORS)
                .filter(move |&b| b != a)
                .map(move |b| (a, b))
        })
        .collect();
    SKILL_NAMES[..opts.skills]
        .iter()
        .map(|name| {
            let mut fitness = vec![];
            let mut heldout = vec![];
            for s in 0..opts.subjects {
                let answer = format!("a{:02}", rand::Rng::random_range(rng, 0..ANSWERS));
                let chosen: Vec<_> = pairs.choose_multiple(rng, per).copied().collect();
                for (j, (d1, d2)) in chosen.into_iter().enumerate() {
                    let ex = Example::answer(
                        format!("d{d1:02} {name}{s:02} d{d2:02} ="),
                        answer.clone(),
                    );
                    if j < opts.fitness_per_subject {
                        fitness.push(ex);
                    } else {
                        heldout.push(ex);
                    }
                }
            }
            Skill {
                name: name.to_string(),
                fitness,
                heldout,
            }
        })
        .collect()
}

/// The demo tasks' own settings, written in their files: one answer word, no stop string
/// needed.
fn task_settings() -> TaskSettings {
    TaskSettings {
        max_new_tokens: Some(1),
        ..TaskSettings::default()
    }
}

fn scoring() -> Scoring {
    task_settings().resolve().expect("valid settings")
}

type Tensors = BTreeMap<String, HostTensor>;

fn model_of(cfg: &LlamaConfig, t: &Tensors) -> Result<LlamaModel<CpuBackend>> {
    LlamaModel::from_tensors(&CpuBackend, cfg.clone(), |name| {
        t.get(name)
            .cloned()
            .ok_or_else(|| Error::tensor(name, "missing from the synthetic model"))
    })
}

/// The last position's activations of every prompt: (`down_proj` inputs, final hidden states).
fn probe(model: &LlamaModel<CpuBackend>, prompts: &[Vec<u32>]) -> Result<Probe> {
    let mut step = Step::default();
    for (slot, p) in prompts.iter().enumerate() {
        for (pos, &t) in p.iter().enumerate() {
            step.push(t, slot, pos, pos + 1 == p.len());
        }
    }
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(1);
    let mut cache = model.new_cache(&CpuBackend, prompts.len(), longest)?;
    let mut state = model.new_state();
    let mut logits = vec![];
    let mut probe = Probe::default();
    model.forward_probed(
        &CpuBackend,
        &step,
        &mut cache,
        &mut state,
        &mut logits,
        Some(&mut probe),
    )?;
    Ok(probe)
}

/// Solves `(A + λI) X = B` for symmetric positive definite `A` `[n, n]` and `B` `[n, m]` by
/// Cholesky, in f64.
fn ridge_solve(a: &[f64], n: usize, lambda: f64, b: &[f64], m: usize) -> Vec<f64> {
    let mut l = vec![0.0f64; n * n];
    for i in 0..n {
        for j in 0..=i {
            let mut s = a[i * n + j] + if i == j { lambda } else { 0.0 };
            for k in 0..j {
                s -= l[i * n + k] * l[j * n + k];
            }
            l[i * n + j] = if i == j {
                s.max(f64::MIN_POSITIVE).sqrt()
            } else {
                s / l[j * n + j]
            };
        }
    }
    let mut x = b.to_vec();
    for c in 0..m {
        for i in 0..n {
            let mut s = x[i * m + c];
            for k in 0..i {
                s -= l[i * n + k] * x[k * m + c];
            }
            x[i * m + c] = s / l[i * n + i];
        }
        for i in (0..n).rev() {
            let mut s = x[i * m + c];
            for k in i + 1..n {
                s -= l[k * n + i] * x[k * m + c];
            }
            x[i * m + c] = s / l[i * n + i];
        }
    }
    x
}

fn unit(v: Vec<f32>) -> Vec<f32> {
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
    v.into_iter().map(|x| x / n).collect()
}

fn f32_of(t: &HostTensor) -> Vec<f32> {
    t.to_f32()
}

/// Builds the demo into `out`: `base/`, `experts/<skill>/`, `tasks/<skill>.{fitness,heldout}.jsonl`,
/// `cycleqd.toml` and `synth.json` (the measured scores). `out` must not exist yet or be empty.
pub fn synthesize(out: &Path, opts: &SynthOptions) -> Result<SynthReport> {
    if !(2..=SKILL_NAMES.len()).contains(&opts.skills) {
        return Err(Error::invalid(format!(
            "--skills must be between 2 and {}, got {}",
            SKILL_NAMES.len(),
            opts.skills
        )));
    }
    if opts.subjects == 0 || opts.fitness_per_subject == 0 || opts.heldout_per_subject == 0 {
        return Err(Error::invalid(
            "synth needs at least one subject and one fitness and held-out prompt per subject",
        ));
    }
    let pairs = DISTRACTORS * (DISTRACTORS - 1);
    if opts.fitness_per_subject + opts.heldout_per_subject > pairs {
        return Err(Error::invalid(format!(
            "at most {pairs} prompts per subject (distinct distractor pairs), asked for {} fitness and {} held-out",
            opts.fitness_per_subject, opts.heldout_per_subject
        )));
    }
    if out.exists()
        && std::fs::read_dir(out)
            .map_err(|e| Error::io(out, e))?
            .next()
            .is_some()
    {
        return Err(Error::format(out, "output folder exists and is not empty"));
    }
    let mut rng = ChaCha8Rng::seed_from_u64(opts.seed);
    let vocab = build_vocab(opts.skills, opts.subjects);
    let skills = build_skills(opts, &mut rng);

    // Work in a hidden staging folder; move into place only when complete.
    let parent = out.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(if parent.as_os_str().is_empty() {
        Path::new(".")
    } else {
        parent
    })
    .map_err(|e| Error::io(parent, e))?;
    let stage = parent.join(format!(
        ".{}.synth-{}",
        out.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "demo".into()),
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&stage);
    std::fs::create_dir_all(stage.join("tasks")).map_err(|e| Error::io(&stage, e))?;
    let tok_path = stage.join("tokenizer.json");
    let tok_bytes = serde_json::to_vec(&tokenizer_json(&vocab)).expect("JSON serialises");
    write_synced(&tok_path, &tok_bytes)?;
    let tokenizer = Tokenizer::from_file(&tok_path)?;

    // Tasks, written and read back through the normal loader.
    let mut fitness_tasks = vec![];
    let mut heldout_tasks = vec![];
    for s in &skills {
        for (split, examples, dst) in [
            ("fitness", &s.fitness, &mut fitness_tasks),
            ("heldout", &s.heldout, &mut heldout_tasks),
        ] {
            let p = stage
                .join("tasks")
                .join(format!("{}.{split}.jsonl", s.name));
            write_synced(&p, to_jsonl(Some(&task_settings()), examples).as_bytes())?;
            dst.push(PreparedTask::new(
                &tokenizer,
                &s.name,
                &TaskFile::load(&p)?,
                scoring(),
            )?);
        }
    }

    // The base, with the junk word as its answer to every prompt.
    let (cfg, named) = random_llama(&DEMO_SHAPE, DType::F32, opts.seed ^ 0xBA5E)?;
    let mut base: Tensors = named.into_iter().collect();
    let (h, inter) = (cfg.hidden_size, cfg.intermediate_size);
    let all_prompts: Vec<Vec<u32>> = skills
        .iter()
        .flat_map(|s| s.fitness.iter().chain(&s.heldout))
        .map(|e| tokenizer.encode(e.prompt().expect("synthetic skills have prompts")))
        .collect::<Result<_>>()?;
    let probed = probe(&model_of(&cfg, &base)?, &all_prompts)?;
    let junk = vocab.id("junk") as usize;
    let head = f32_of(&base["lm_head.weight"]);
    let n_all = all_prompts.len();
    let mut mean_h = vec![0.0f32; h];
    for r in probed.final_hidden.chunks_exact(h) {
        mean_h
            .iter_mut()
            .zip(r)
            .for_each(|(m, x)| *m += x / n_all as f32);
    }
    let mean_dir = unit(mean_h);
    // Scale the junk row so that its logit beats every other by JUNK_MARGIN on every prompt.
    let mut beta = 0.0f32;
    for r in probed.final_hidden.chunks_exact(h) {
        let proj: f32 = r.iter().zip(&mean_dir).map(|(a, b)| a * b).sum();
        let best_other = (0..cfg.vocab_size)
            .filter(|&t| t != junk)
            .map(|t| {
                r.iter()
                    .zip(&head[t * h..(t + 1) * h])
                    .map(|(a, b)| a * b)
                    .sum::<f32>()
            })
            .fold(f32::NEG_INFINITY, f32::max);
        if proj <= 0.0 {
            return Err(Error::invalid(
                "synth: a prompt's hidden state points away from the mean; try another --seed",
            ));
        }
        beta = beta.max((best_other + JUNK_MARGIN) / proj);
    }
    let mut head = head;
    head[junk * h..(junk + 1) * h]
        .iter_mut()
        .zip(&mean_dir)
        .for_each(|(w, d)| *w = beta * d);
    base.insert(
        "lm_head.weight".into(),
        HostTensor::from_f32(&head, vec![cfg.vocab_size, h], DType::F32),
    );

    // Keys of every fitness prompt on the (final) base.
    let base_model = model_of(&cfg, &base)?;
    let norm_w = f32_of(&base["model.norm.weight"]);
    let answer_ids: Vec<usize> = (0..ANSWERS)
        .map(|i| vocab.id(&format!("a{i:02}")) as usize)
        .collect();
    let mean_answer_row: Vec<f32> = (0..h)
        .map(|j| answer_ids.iter().map(|&t| head[t * h + j]).sum::<f32>() / ANSWERS as f32)
        .collect();
    // The residual-stream direction that raises a token's logit (through the final norm's gain).
    let push = |row: &[f32]| unit(row.iter().zip(&norm_w).map(|(a, w)| a * w).collect());
    let junk_dir = push(&head[junk * h..(junk + 1) * h]);
    let down_name = format!(
        "model.layers.{}.mlp.down_proj.weight",
        cfg.num_hidden_layers - 1
    );
    let down = f32_of(&base[&down_name]);

    let mut edits = vec![];
    for s in &skills {
        let prompts: Vec<Vec<u32>> = s
            .fitness
            .iter()
            .map(|e| tokenizer.encode(e.prompt().expect("synthetic skills have prompts")))
            .collect::<Result<_>>()?;
        let keys = probe(&base_model, &prompts)?.last_mlp_input;
        let n = prompts.len();
        // Targets: toward the answer's row (relative to the answer range), away from junk.
        let mut r = vec![0.0f64; n * h];
        for (i, e) in s.fitness.iter().enumerate() {
            let Target::Answer(answer) = &e.target else {
                unreachable!("synthetic skills have answers")
            };
            let t = vocab.id(answer) as usize;
            let rel: Vec<f32> = head[t * h..(t + 1) * h]
                .iter()
                .zip(&mean_answer_row)
                .map(|(a, m)| a - m)
                .collect();
            let dir = push(&rel);
            for j in 0..h {
                r[i * h + j] =
                    ((1.0 - JUNK_SUPPRESSION) * dir[j] - JUNK_SUPPRESSION * junk_dir[j]) as f64;
            }
        }
        // ΔW = Rᵀ (K Kᵀ + λI)⁻¹ K, [h, inter].
        let mut kkt = vec![0.0f64; n * n];
        for i in 0..n {
            for j in 0..n {
                kkt[i * n + j] = (0..inter)
                    .map(|c| keys[i * inter + c] as f64 * keys[j * inter + c] as f64)
                    .sum();
            }
        }
        let mean_sq = (0..n).map(|i| kkt[i * n + i]).sum::<f64>() / n as f64;
        let x = ridge_solve(&kkt, n, RIDGE * mean_sq, &r, h); // (KKᵀ+λI)⁻¹ R, [n, h]
        let mut dw = vec![0.0f32; h * inter];
        for o in 0..h {
            for c in 0..inter {
                dw[o * inter + c] = (0..n)
                    .map(|i| x[i * h + o] * keys[i * inter + c] as f64)
                    .sum::<f64>() as f32;
            }
        }
        edits.push(dw);
    }

    let with_edit = |dws: &[(&Vec<f32>, f32)]| -> Tensors {
        let mut w = down.clone();
        for (dw, s) in dws {
            w.iter_mut().zip(dw.iter()).for_each(|(w, d)| *w += s * d);
        }
        let mut t = base.clone();
        t.insert(
            down_name.clone(),
            HostTensor::from_f32(&w, vec![h, inter], DType::F32),
        );
        t
    };
    let score = |t: &Tensors, tasks: &[PreparedTask]| -> Result<Vec<f64>> {
        let refs: Vec<&PreparedTask> = tasks.iter().collect();
        Ok(
            evaluate(&model_of(&cfg, t)?, &CpuBackend, &tokenizer, &refs, 256)?
                .into_iter()
                .map(|r| r.score)
                .collect(),
        )
    };

    // The smallest strength reaching the target on the expert's own fitness split.
    let mut strengths = vec![];
    for (k, dw) in edits.iter().enumerate() {
        let own = |s: f32| -> Result<f64> {
            Ok(score(&with_edit(&[(dw, s)]), &fitness_tasks[k..k + 1])?[0])
        };
        let (mut lo, mut hi) = (0.0f32, 1.0f32);
        while own(hi)? < opts.expert_target {
            lo = hi;
            hi *= 2.0;
            if hi > 1e4 {
                return Err(Error::invalid(format!(
                    "synth: skill {} cannot reach {} with a down_proj edit; try another --seed",
                    skills[k].name, opts.expert_target
                )));
            }
        }
        for _ in 0..16 {
            let mid = 0.5 * (lo + hi);
            if own(mid)? >= opts.expert_target {
                hi = mid;
            } else {
                lo = mid;
            }
        }
        strengths.push(hi);
    }

    // Write the checkpoints.
    let config_json = cfg.to_json_with_dtype(DType::F32);
    let write_model = |dir: &Path, t: &Tensors| -> Result<()> {
        let specs = cfg
            .expected_tensors()
            .into_iter()
            .map(|(name, shape)| TensorSpec {
                name,
                dtype: DType::F32,
                shape,
            })
            .collect();
        let w = CheckpointWriter::create(dir, specs, u64::MAX)?;
        for (name, _) in cfg.expected_tensors() {
            w.write(&name, t[&name].data())?;
        }
        w.add_file("tokenizer.json", &tok_bytes)?;
        w.add_file(
            "tokenizer_config.json",
            &serde_json::to_vec_pretty(&tokenizer_config_json()).expect("JSON serialises"),
        )?;
        w.add_file(
            "generation_config.json",
            br#"{"bos_token_id": 0, "eos_token_id": 1}"#,
        )?;
        w.finish(&config_json, None)
    };
    write_model(&stage.join("base"), &base)?;
    std::fs::create_dir_all(stage.join("experts")).map_err(|e| Error::io(&stage, e))?;
    let expert_tensors: Vec<Tensors> = edits
        .iter()
        .zip(&strengths)
        .map(|(dw, &s)| with_edit(&[(dw, s)]))
        .collect();
    for (s, t) in skills.iter().zip(&expert_tensors) {
        write_model(&stage.join("experts").join(&s.name), t)?;
    }

    // Measure what the demo needs, on the written tensors.
    let mut scores = vec![];
    let mut measure = |name: &str, t: &Tensors| -> Result<ModelScores> {
        let m = ModelScores {
            model: name.to_string(),
            fitness: score(t, &fitness_tasks)?,
            heldout: score(t, &heldout_tasks)?,
        };
        scores.push(m.clone());
        Ok(m)
    };
    let base_scores = measure("base", &base)?;
    let expert_scores: Vec<ModelScores> = skills
        .iter()
        .zip(&expert_tensors)
        .map(|(s, t)| measure(&format!("expert {}", s.name), t))
        .collect::<Result<_>>()?;
    let k = skills.len();
    let linear: Vec<(&Vec<f32>, f32)> = edits
        .iter()
        .zip(&strengths)
        .map(|(dw, &s)| (dw, s / k as f32))
        .collect();
    let linear_scores = measure("linear merge", &with_edit(&linear))?;

    let mut requirements = vec![];
    for (i, (s, e)) in skills.iter().zip(&expert_scores).enumerate() {
        requirements.push((
            format!("expert {} ≥ 0.9 on its own task (fitness)", s.name),
            e.fitness[i] >= 0.9,
        ));
        requirements.push((
            format!("expert {} ≤ 0.3 on every other task", s.name),
            (0..k)
                .filter(|&j| j != i)
                .all(|j| e.fitness[j] <= 0.3 && e.heldout[j] <= 0.3),
        ));
        requirements.push((
            format!(
                "linear merge clearly below expert {} on its task (by ≥ 0.2)",
                s.name
            ),
            linear_scores.fitness[i] + 0.2 <= e.fitness[i],
        ));
    }
    requirements.push((
        "base ≤ 0.1 on every task".into(),
        base_scores
            .fitness
            .iter()
            .chain(&base_scores.heldout)
            .all(|&x| x <= 0.1),
    ));

    let report = SynthReport {
        out: out.to_path_buf(),
        skills: skills.iter().map(|s| s.name.clone()).collect(),
        edit_strength: strengths,
        scores,
        requirements,
    };
    write_synced(
        &stage.join("cycleqd.toml"),
        demo_config(&report.skills).as_bytes(),
    )?;
    write_synced(
        &stage.join("synth.json"),
        &serde_json::to_vec_pretty(&report).expect("JSON serialises"),
    )?;
    std::fs::remove_file(&tok_path).map_err(|e| Error::io(&tok_path, e))?;
    if out.exists() {
        std::fs::remove_dir(out).map_err(|e| Error::io(out, e))?;
    }
    std::fs::rename(&stage, out).map_err(|e| Error::io(out, e))?;
    Ok(report)
}

/// The ready-to-run configuration of the demo, with the demo's deviations from the paper's
/// defaults stated where they are set.
fn demo_config(skills: &[String]) -> String {
    let mut s = String::from(
        "# cycleqd-engine run configuration for the synthetic demo (written by `synth`).\n\
         # Paths are relative to this file.\n\n\
         base = \"base\"\n\
         rank = \"full\"\n\n\
         [evolution]\n\
         generations = 900\n\
         seed = 0\n\
         bins = 15\n\
         # The demo's experts sit at their ceiling after one closed-form edit: a larger\n\
         # mutation step than the paper's 0.1 lets children pass them (synthetic-demo.md).\n\
         mutation_w_max = 0.3\n\
         # The elite with the best mean fitness across tasks; the paper's softmax merge of the\n\
         # archives' best elites is computed and reported too.\n\
         final_model = \"best_mean\"\n\
         checkpoint_every = 50\n",
    );
    for name in skills {
        s.push_str(&format!(
            "\n[[tasks]]\nname = \"{name}\"\nexpert = \"experts/{name}\"\n\
             fitness = \"tasks/{name}.fitness.jsonl\"\nheldout = \"tasks/{name}.heldout.jsonl\"\n\
             metric = \"exact_match\"\nmax_new_tokens = 1\n"
        ));
    }
    s
}
