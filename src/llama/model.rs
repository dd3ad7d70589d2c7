//! The Llama forward pass, written once against [`Backend`].
//!
//! One call processes a ragged batch: token `i` belongs to KV slot `slots[i]` at position
//! `positions[i]`, so a prefill of several prompts of different lengths and a decode step of
//! many sequences are the same call, with no padding. Per layer:
//! `h = x + o(attn(rope(q(n₁(x))), rope(k(n₁(x))), v(n₁(x))))`, `x' = h + down(silu(gate(n₂(h))) ⊙ up(n₂(h)))`.

use crate::backend::{on_compute_threads, AttentionGeometry, Backend};
use crate::error::{Error, Result};
use crate::model::config::rope_inv_freq;
use crate::model::{DType, HostTensor, LlamaConfig, ModelStore};

struct Layer<B: Backend> {
    input_norm: B::Weight,
    q: B::Weight,
    k: B::Weight,
    v: B::Weight,
    o: B::Weight,
    post_norm: B::Weight,
    gate: B::Weight,
    up: B::Weight,
    down: B::Weight,
}

/// A Llama model's weights, resident on backend `B`.
pub struct LlamaModel<B: Backend> {
    pub config: LlamaConfig,
    embed: B::Weight,
    layers: Vec<Layer<B>>,
    norm: B::Weight,
    /// `None` when the embeddings are tied.
    lm_head: Option<B::Weight>,
    inv_freq: Vec<f32>,
}

/// The KV cache of a batch of sequences: per layer, `[slots, max_seq, kv_heads * head_dim]`.
pub struct KvCache<B: Backend> {
    k: Vec<B::KvBuf>,
    v: Vec<B::KvBuf>,
    pub slots: usize,
    pub max_seq: usize,
    /// The dtype its keys and values are kept in ([`LlamaModel::kv_dtype`] when it was made).
    pub dtype: DType,
}

/// Activation buffers of one forward pass, grown on demand and reused across steps.
pub struct RunState<B: Backend> {
    capacity: usize,
    logit_capacity: usize,
    x: B::Buf,
    xb: B::Buf,
    q: B::Buf,
    k: B::Buf,
    v: B::Buf,
    att: B::Buf,
    gate: B::Buf,
    up: B::Buf,
    picked: B::Buf,
    logits: B::Buf,
}

/// Activations of a step's logit rows, copied out by [`LlamaModel::forward_probed`].
#[derive(Clone, Debug, Default)]
pub struct Probe {
    /// The last layer's `down_proj` input, `[logit_rows, intermediate_size]`.
    pub last_mlp_input: Vec<f32>,
    /// The final-norm output that feeds `lm_head`, `[logit_rows, hidden_size]`.
    pub final_hidden: Vec<f32>,
}

/// One ragged batch of tokens.
#[derive(Clone, Debug, Default)]
pub struct Step {
    pub tokens: Vec<u32>,
    pub slots: Vec<u32>,
    pub positions: Vec<u32>,
    /// Row indices (into `tokens`) whose logits are wanted, in output order.
    pub logit_rows: Vec<u32>,
}

impl Step {
    pub fn push(&mut self, token: u32, slot: usize, position: usize, want_logits: bool) {
        if want_logits {
            self.logit_rows.push(self.tokens.len() as u32);
        }
        self.tokens.push(token);
        self.slots.push(slot as u32);
        self.positions.push(position as u32);
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }
}

impl<B: Backend> LlamaModel<B> {
    /// Loads the weights of a validated store onto the backend (zero-copy on the CPU); a
    /// weight holding NaN or Inf is refused.
    pub fn load(backend: &B, store: &ModelStore) -> Result<Self> {
        store.validate_llama()?;
        store.check_finite()?;
        Self::from_tensors(backend, store.config().clone(), |name| store.tensor(name))
    }

    /// Builds a model from any tensor source (a store, a materialised child, a merge result).
    pub fn from_tensors(
        backend: &B,
        config: LlamaConfig,
        mut get: impl FnMut(&str) -> Result<HostTensor>,
    ) -> Result<Self> {
        Self::from_weights(config, |name| backend.upload_weight(&get(name)?))
    }

    /// Builds a model from weights already where `B` computes (a child materialised on the
    /// device, or benchmark weights generated there). `w` is asked for every name of
    /// [`LlamaModel::weight_names`], in that order.
    pub fn from_weights(
        config: LlamaConfig,
        mut w: impl FnMut(&str) -> Result<B::Weight>,
    ) -> Result<Self> {
        let mut names = Self::weight_names(&config).into_iter();
        let mut next = || -> Result<B::Weight> {
            let name = names.next().expect("one name per weight");
            w(&name)
        };
        let layers = (0..config.num_hidden_layers)
            .map(|_| {
                Ok(Layer {
                    input_norm: next()?,
                    q: next()?,
                    k: next()?,
                    v: next()?,
                    o: next()?,
                    post_norm: next()?,
                    gate: next()?,
                    up: next()?,
                    down: next()?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let embed = next()?;
        let norm = next()?;
        let lm_head = if config.tie_word_embeddings {
            None
        } else {
            Some(next()?)
        };
        let inv_freq = rope_inv_freq(&config);
        Ok(LlamaModel {
            config,
            embed,
            layers,
            norm,
            lm_head,
            inv_freq,
        })
    }

    /// The safetensors name of every weight the model holds, in the order of
    /// [`LlamaModel::from_weights`] and [`LlamaModel::weights_mut`].
    pub fn weight_names(config: &LlamaConfig) -> Vec<String> {
        let mut names = vec![];
        for l in 0..config.num_hidden_layers {
            let p = format!("model.layers.{l}");
            for part in [
                "input_layernorm",
                "self_attn.q_proj",
                "self_attn.k_proj",
                "self_attn.v_proj",
                "self_attn.o_proj",
                "post_attention_layernorm",
                "mlp.gate_proj",
                "mlp.up_proj",
                "mlp.down_proj",
            ] {
                names.push(format!("{p}.{part}.weight"));
            }
        }
        names.push("model.embed_tokens.weight".into());
        names.push("model.norm.weight".into());
        if !config.tie_word_embeddings {
            names.push("lm_head.weight".into());
        }
        names
    }

    /// Every weight, in the order of [`LlamaModel::weight_names`], to be rewritten in place (a
    /// child materialised into the previous child's weights).
    pub fn weights_mut(&mut self) -> Vec<&mut B::Weight> {
        let mut out = Vec::with_capacity(self.layers.len() * 9 + 3);
        for l in &mut self.layers {
            out.extend([
                &mut l.input_norm,
                &mut l.q,
                &mut l.k,
                &mut l.v,
                &mut l.o,
                &mut l.post_norm,
                &mut l.gate,
                &mut l.up,
                &mut l.down,
            ]);
        }
        out.push(&mut self.embed);
        out.push(&mut self.norm);
        if let Some(h) = &mut self.lm_head {
            out.push(h);
        }
        out
    }

    /// Every weight, in the order of [`LlamaModel::weight_names`].
    pub fn weights(&self) -> Vec<&B::Weight> {
        let mut out = Vec::with_capacity(self.layers.len() * 9 + 3);
        for l in &self.layers {
            out.extend([
                &l.input_norm,
                &l.q,
                &l.k,
                &l.v,
                &l.o,
                &l.post_norm,
                &l.gate,
                &l.up,
                &l.down,
            ]);
        }
        out.push(&self.embed);
        out.push(&self.norm);
        if let Some(h) = &self.lm_head {
            out.push(h);
        }
        out
    }

    /// The dtype `backend` keeps this model's keys and values in: bf16 where it computes their
    /// projections in bf16, as transformers and vLLM keep a bf16 model's cache.
    pub fn kv_dtype(&self, backend: &B) -> DType {
        self.layers
            .first()
            .map_or(DType::F32, |l| backend.kv_dtype(&l.k))
    }

    /// A zeroed KV cache for `slots` sequences of at most `max_seq` positions.
    pub fn new_cache(&self, backend: &B, slots: usize, max_seq: usize) -> Result<KvCache<B>> {
        let width = self.config.num_key_value_heads * self.config.head_dim;
        let n = slots
            .checked_mul(max_seq)
            .and_then(|v| v.checked_mul(width))
            .ok_or_else(|| {
                Error::invalid(format!(
                    "a KV cache of {slots} sequences × {max_seq} positions overflows sizes"
                ))
            })?;
        let dtype = self.kv_dtype(backend);
        // The whole cache (every layer, keys and values) before any of it is allocated.
        let total = n
            .checked_mul(2 * dtype.size() * self.layers.len())
            .ok_or_else(|| Error::invalid("the KV cache's size overflows"))?;
        backend.check_room(
            &format!("a KV cache of {slots} sequences × {max_seq} positions"),
            total,
        )?;
        let mut k = Vec::with_capacity(self.layers.len());
        let mut v = Vec::with_capacity(self.layers.len());
        for _ in &self.layers {
            k.push(backend.kv_zeros(n, dtype)?);
            v.push(backend.kv_zeros(n, dtype)?);
        }
        Ok(KvCache {
            k,
            v,
            slots,
            max_seq,
            dtype,
        })
    }

    pub fn new_state(&self) -> RunState<B>
    where
        B::Buf: Default,
    {
        RunState {
            capacity: 0,
            logit_capacity: 0,
            x: Default::default(),
            xb: Default::default(),
            q: Default::default(),
            k: Default::default(),
            v: Default::default(),
            att: Default::default(),
            gate: Default::default(),
            up: Default::default(),
            picked: Default::default(),
            logits: Default::default(),
        }
    }

    fn ensure_state(
        &self,
        backend: &B,
        st: &mut RunState<B>,
        rows: usize,
        logit_rows: usize,
    ) -> Result<()> {
        let c = &self.config;
        if rows > st.capacity {
            let h = c.hidden_size;
            let qw = c.num_attention_heads * c.head_dim;
            let kvw = c.num_key_value_heads * c.head_dim;
            st.x = backend.zeros(rows * h)?;
            st.xb = backend.zeros(rows * h.max(qw))?;
            st.q = backend.zeros(rows * qw)?;
            st.k = backend.zeros(rows * kvw)?;
            st.v = backend.zeros(rows * kvw)?;
            st.att = backend.zeros(rows * qw)?;
            st.gate = backend.zeros(rows * c.intermediate_size)?;
            st.up = backend.zeros(rows * c.intermediate_size)?;
            st.capacity = rows;
        }
        if logit_rows > st.logit_capacity {
            st.picked = backend.zeros(logit_rows * c.hidden_size)?;
            st.logits = backend.zeros(logit_rows * c.vocab_size)?;
            st.logit_capacity = logit_rows;
        }
        Ok(())
    }

    /// Runs one ragged batch through the model, appending its K/V to `cache`, and writes the
    /// logits of `step.logit_rows` into `logits` (`[logit_rows.len(), vocab]`, resized).
    pub fn forward(
        &self,
        backend: &B,
        step: &Step,
        cache: &mut KvCache<B>,
        st: &mut RunState<B>,
        logits: &mut Vec<f32>,
    ) -> Result<()> {
        self.forward_probed(backend, step, cache, st, logits, None)
    }

    /// [`LlamaModel::forward`], also copying internal activations of the logit rows into
    /// `probe` (used to compute closed-form weight edits, e.g. by `synth`).
    pub fn forward_probed(
        &self,
        backend: &B,
        step: &Step,
        cache: &mut KvCache<B>,
        st: &mut RunState<B>,
        logits: &mut Vec<f32>,
        probe: Option<&mut Probe>,
    ) -> Result<()> {
        on_compute_threads::<B, _>(|| {
            self.forward_into_state(backend, step, cache, st, probe)?;
            let n = step.logit_rows.len() * self.config.vocab_size;
            logits.resize(n, 0.0);
            if n == 0 {
                return Ok(());
            }
            backend.download(logits, &st.logits)
        })
    }

    /// The forward pass, leaving the logit rows in `st.logits` where the backend computes.
    /// Callers run it through [`on_compute_threads`]: on the CPU, its ~15 parallel loops a
    /// layer then split on the pool's threads instead of each being injected into the pool
    /// from outside and waited for.
    fn forward_into_state(
        &self,
        backend: &B,
        step: &Step,
        cache: &mut KvCache<B>,
        st: &mut RunState<B>,
        mut probe: Option<&mut Probe>,
    ) -> Result<()> {
        let c = &self.config;
        let rows = step.tokens.len();
        if rows == 0 {
            return Ok(());
        }
        if step.slots.len() != rows || step.positions.len() != rows {
            return Err(Error::invalid(
                "forward: tokens, slots and positions differ in length",
            ));
        }
        if let Some(&id) = step.tokens.iter().find(|&&t| t as usize >= c.vocab_size) {
            return Err(Error::invalid(format!(
                "token id {id} is out of range (vocab_size {})",
                c.vocab_size
            )));
        }
        if let Some(&p) = step
            .positions
            .iter()
            .find(|&&p| p as usize >= cache.max_seq)
        {
            return Err(Error::invalid(format!(
                "position {p} is past the KV cache length {}",
                cache.max_seq
            )));
        }
        if let Some(&s) = step.slots.iter().find(|&&s| s as usize >= cache.slots) {
            return Err(Error::invalid(format!(
                "slot {s} is past the KV cache's {} slots",
                cache.slots
            )));
        }
        if let Some(&r) = step.logit_rows.iter().find(|&&r| r as usize >= rows) {
            return Err(Error::invalid(format!(
                "logit row {r} is past the batch's {rows} rows"
            )));
        }
        let n_logits = step.logit_rows.len();
        self.ensure_state(backend, st, rows, n_logits)?;

        let h = c.hidden_size;
        let (nh, nkv, hd) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
        let (qw, kvw, inter) = (nh * hd, nkv * hd, c.intermediate_size);
        let eps = c.rms_norm_eps as f32;
        let geom = AttentionGeometry {
            num_heads: nh,
            num_kv_heads: nkv,
            head_dim: hd,
            max_seq: cache.max_seq,
        };

        backend.embedding(&mut st.x, &self.embed, &step.tokens, h)?;
        for (l, layer) in self.layers.iter().enumerate() {
            backend.rms_norm(&mut st.xb, &st.x, &layer.input_norm, rows, h, eps)?;
            backend.matmul_t_shared(
                &mut [&mut st.q, &mut st.k, &mut st.v],
                &st.xb,
                &[&layer.q, &layer.k, &layer.v],
                &[qw, kvw, kvw],
                rows,
                h,
            )?;
            backend.rope(&mut st.q, &step.positions, nh, hd, &self.inv_freq)?;
            backend.rope(&mut st.k, &step.positions, nkv, hd, &self.inv_freq)?;
            backend.kv_store(
                &mut cache.k[l],
                &st.k,
                &step.slots,
                &step.positions,
                cache.max_seq,
                kvw,
            )?;
            backend.kv_store(
                &mut cache.v[l],
                &st.v,
                &step.slots,
                &step.positions,
                cache.max_seq,
                kvw,
            )?;
            backend.attention(
                &mut st.att,
                &st.q,
                &cache.k[l],
                &cache.v[l],
                &step.slots,
                &step.positions,
                geom,
            )?;
            backend.matmul_t(&mut st.xb, &st.att, &layer.o, rows, h, qw)?;
            backend.add_assign(&mut st.x, &st.xb, rows * h)?;

            backend.rms_norm(&mut st.xb, &st.x, &layer.post_norm, rows, h, eps)?;
            backend.matmul_t_shared(
                &mut [&mut st.gate, &mut st.up],
                &st.xb,
                &[&layer.gate, &layer.up],
                &[inter, inter],
                rows,
                h,
            )?;
            backend.swiglu(&mut st.gate, &st.up, rows * inter)?;
            if let (Some(p), true) = (probe.as_deref_mut(), l + 1 == self.layers.len()) {
                // `up` is dead after SwiGLU: reuse it for the gathered rows.
                backend.gather_rows(&mut st.up, &st.gate, &step.logit_rows, inter)?;
                p.last_mlp_input.resize(n_logits * inter, 0.0);
                backend.download(&mut p.last_mlp_input, &st.up)?;
            }
            backend.matmul_t(&mut st.xb, &st.gate, &layer.down, rows, h, inter)?;
            backend.add_assign(&mut st.x, &st.xb, rows * h)?;
        }

        if n_logits == 0 {
            return Ok(());
        }
        // Only the wanted rows go through the final norm and the (large) lm_head.
        backend.gather_rows(&mut st.xb, &st.x, &step.logit_rows, h)?;
        backend.rms_norm(&mut st.picked, &st.xb, &self.norm, n_logits, h, eps)?;
        if let Some(p) = probe {
            p.final_hidden.resize(n_logits * h, 0.0);
            backend.download(&mut p.final_hidden, &st.picked)?;
        }
        let head = self.lm_head.as_ref().unwrap_or(&self.embed);
        backend.matmul_t(&mut st.logits, &st.picked, head, n_logits, c.vocab_size, h)
    }

    /// One batch through the model, then the greedy next token of each logit row, chosen
    /// where the logits are (no copy of whole logit rows to the host).
    pub fn forward_greedy(
        &self,
        backend: &B,
        step: &Step,
        cache: &mut KvCache<B>,
        st: &mut RunState<B>,
        next: &mut Vec<u32>,
    ) -> Result<()> {
        on_compute_threads::<B, _>(|| {
            self.forward_into_state(backend, step, cache, st, None)?;
            next.resize(step.logit_rows.len(), 0);
            backend.argmax_rows(
                next,
                &st.logits,
                step.logit_rows.len(),
                self.config.vocab_size,
            )
        })
    }
}
