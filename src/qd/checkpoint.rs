//! Run checkpoints and genome files: one safetensors file whose tensors are the held genomes
//! (flat f32 coefficients, [`Genome::to_flat`]) and whose metadata carries the population's
//! JSON state, the length of `events.jsonl` it corresponds to, the run's configuration and a
//! checksum of the data. Written to a temporary name, fsynced and renamed, so a kill at any
//! moment leaves either the previous checkpoint or the new one, never a mix.

use std::collections::BTreeMap;
use std::path::Path;

use crate::error::{Error, Result};
use crate::evolve::cache::{checksum_hex, verify_checksum};
use crate::evolve::{ExpertSet, Genome};
use crate::model::export::write_atomic;
use crate::model::safetensors::{build_header, parse_header, TensorSpec};
use crate::model::DType;

use super::cycle::Population;

const FORMAT: &str = "cycleqd-engine checkpoint";
const VERSION: &str = "1";

/// What a checkpoint holds besides the population.
#[derive(Clone, Debug, PartialEq)]
pub struct CheckpointMeta {
    /// Bytes of `events.jsonl` written when the checkpoint was taken.
    pub events_len: u64,
    /// The run's resolved configuration (TOML), to refuse resuming another run.
    pub config: String,
}

/// Writes genomes (by id) as a safetensors file with `metadata`, atomically.
pub fn write_genomes(
    path: &Path,
    genomes: &BTreeMap<String, Genome>,
    mut metadata: BTreeMap<String, String>,
) -> Result<()> {
    let mut specs = vec![];
    let mut data: Vec<u8> = vec![];
    for (id, g) in genomes {
        let flat = g.to_flat();
        specs.push(TensorSpec {
            name: id.clone(),
            dtype: DType::F32,
            shape: vec![flat.len()],
        });
        data.extend_from_slice(bytemuck::cast_slice(&flat));
    }
    metadata.insert("checksum".into(), checksum_hex(&data));
    let (mut bytes, _) = build_header(&specs, &metadata);
    bytes.extend_from_slice(&data);
    write_atomic(path, &bytes)
}

/// Reads a genome file written by [`write_genomes`]: its genomes (checked against `set`'s
/// layout) and metadata. A checksum mismatch or a malformed file is an error naming the file.
pub fn read_genomes(
    path: &Path,
    set: &ExpertSet,
) -> Result<(BTreeMap<String, Genome>, BTreeMap<String, String>)> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let header = parse_header(&bytes, path)?;
    verify_checksum(&bytes, &header, path, "genome file")?;
    let mut genomes = BTreeMap::new();
    for (id, e) in &header.tensors {
        if e.dtype != DType::F32 {
            return Err(Error::format(path, format!("genome `{id}` is not F32")));
        }
        let flat: Vec<f32> = bytes[e.start..e.end]
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let g = Genome::from_flat(set, &flat)
            .map_err(|err| Error::format(path, format!("genome `{id}`: {err}")))?;
        genomes.insert(id.clone(), g);
    }
    Ok((genomes, header.metadata))
}

/// Saves the population and its metadata.
pub fn save(path: &Path, pop: &Population, meta: &CheckpointMeta) -> Result<()> {
    let metadata = BTreeMap::from([
        ("format".to_string(), FORMAT.to_string()),
        ("version".to_string(), VERSION.to_string()),
        (
            "state".to_string(),
            serde_json::to_string(pop).expect("the population serialises"),
        ),
        ("events_len".to_string(), meta.events_len.to_string()),
        ("config".to_string(), meta.config.clone()),
    ]);
    write_genomes(path, &pop.genomes, metadata)
}

/// Loads a checkpoint written by [`save`] for the expert set `set`.
pub fn load(path: &Path, set: &ExpertSet) -> Result<(Population, CheckpointMeta)> {
    let (genomes, md) = read_genomes(path, set)?;
    let get = |k: &str| {
        md.get(k)
            .ok_or_else(|| Error::format(path, format!("checkpoint metadata has no `{k}`")))
    };
    if get("format")? != FORMAT || get("version")? != VERSION {
        return Err(Error::format(
            path,
            "not a cycleqd-engine checkpoint of this version",
        ));
    }
    let mut pop: Population = serde_json::from_str(get("state")?)
        .map_err(|e| Error::format(path, format!("invalid state: {e}")))?;
    pop.genomes = genomes;
    if let Some(id) = pop
        .individuals
        .keys()
        .find(|id| !pop.genomes.contains_key(*id))
    {
        return Err(Error::format(
            path,
            format!("individual `{id}` has no genome"),
        ));
    }
    let events_len = get("events_len")?
        .parse()
        .map_err(|_| Error::format(path, "`events_len` is not an integer"))?;
    Ok((
        pop,
        CheckpointMeta {
            events_len,
            config: get("config")?.clone(),
        },
    ))
}
