//! Run checkpoints and genome files: one safetensors file whose tensors are genomes (flat f32
//! coefficients, [`Genome::to_flat`]) and whose metadata carries the population's JSON state,
//! the length of `events.jsonl` it corresponds to, the run's configuration, the next child
//! number and the children in flight (their specs; their genomes are tensors
//! `in-flight/child-N`), sealed by a checksum over data and metadata. Written to a temporary
//! name, fsynced and renamed, so a kill at any moment leaves either the previous checkpoint or
//! the new one, never a mix.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use crate::durable::{self, write_atomic, Coverage};
use crate::error::{Error, Result};
use crate::evolve::{ExpertSet, Genome};
use crate::model::safetensors::{build_header, parse_header, TensorSpec};
use crate::model::DType;

use super::cycle::{ChildSpec, Population};

const FORMAT: &str = "cycleqd-engine checkpoint";
/// 2: the checksum covers the metadata; children in flight and the next child are recorded.
const VERSION: &str = "2";
const IN_FLIGHT: &str = "in-flight/";

/// What a checkpoint holds besides the population.
#[derive(Clone, Debug, PartialEq)]
pub struct CheckpointMeta {
    /// Bytes of `events.jsonl` written when the checkpoint was taken.
    pub events_len: u64,
    /// The run's resolved configuration (TOML), to refuse resuming another run.
    pub config: String,
    /// The next child number to breed.
    pub next_child: u64,
    /// Children bred but not yet applied (re-issued on resume), in child order.
    pub in_flight: Vec<ChildSpec>,
}

/// The bytes of a genome file holding `genomes` (by name) with `metadata`, sealed.
fn encode_genomes<'a>(
    genomes: impl Iterator<Item = (String, &'a Genome)>,
    mut metadata: BTreeMap<String, String>,
) -> Vec<u8> {
    let mut specs = vec![];
    let mut data: Vec<u8> = vec![];
    for (id, g) in genomes {
        let flat = g.to_flat();
        specs.push(TensorSpec {
            name: id,
            dtype: DType::F32,
            shape: vec![flat.len()],
        });
        data.extend_from_slice(bytemuck::cast_slice(&flat));
    }
    metadata.insert("checksum".into(), durable::checksum(&data, &metadata));
    let (mut bytes, _) = build_header(&specs, &metadata);
    bytes.extend_from_slice(&data);
    bytes
}

/// Writes genomes (by id) as a safetensors file with `metadata`, atomically.
pub fn write_genomes<'a>(
    path: &Path,
    genomes: impl Iterator<Item = (&'a String, &'a Genome)>,
    metadata: BTreeMap<String, String>,
) -> Result<()> {
    write_atomic(
        path,
        &encode_genomes(genomes.map(|(k, g)| (k.clone(), g)), metadata),
    )
}

/// Reads a genome file: its genomes (checked against `set`'s layout) and metadata. A checksum
/// mismatch or a malformed file is an error naming the file.
pub fn read_genomes(
    path: &Path,
    set: &ExpertSet,
) -> Result<(BTreeMap<String, Genome>, BTreeMap<String, String>)> {
    read_genomes_covered(path, set, |_| Coverage::DataAndMetadata)
}

/// [`read_genomes`], with the checksum's coverage decided from the (unverified) metadata.
fn read_genomes_covered(
    path: &Path,
    set: &ExpertSet,
    coverage: impl Fn(&BTreeMap<String, String>) -> Coverage,
) -> Result<(BTreeMap<String, Genome>, BTreeMap<String, String>)> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let header = parse_header(&bytes, path)?;
    durable::verify(
        &bytes,
        &header,
        path,
        "genome file",
        coverage(&header.metadata),
    )?;
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

/// The bytes of a checkpoint of `pop` with `meta` (built on the coordinator's thread, written
/// by [`write_encoded`] anywhere).
pub fn encode(pop: &Population, meta: &CheckpointMeta) -> Vec<u8> {
    let metadata = BTreeMap::from([
        ("format".to_string(), FORMAT.to_string()),
        ("version".to_string(), VERSION.to_string()),
        (
            "state".to_string(),
            serde_json::to_string(pop).expect("the population serialises"),
        ),
        ("events_len".to_string(), meta.events_len.to_string()),
        ("config".to_string(), meta.config.clone()),
        ("next_child".to_string(), meta.next_child.to_string()),
        (
            "in_flight".to_string(),
            serde_json::to_string(&meta.in_flight).expect("specs serialise"),
        ),
    ]);
    let held = pop.genomes.iter().map(|(k, g)| (k.clone(), &**g));
    let flying = meta
        .in_flight
        .iter()
        .map(|s| (format!("{IN_FLIGHT}{}", s.id()), &*s.genome));
    encode_genomes(held.chain(flying), metadata)
}

/// Writes checkpoint bytes from [`encode`] atomically.
pub fn write_encoded(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic(path, bytes)
}

/// Saves the population and its metadata.
pub fn save(path: &Path, pop: &Population, meta: &CheckpointMeta) -> Result<()> {
    write_encoded(path, &encode(pop, meta))
}

/// A checkpoint's population (without genomes) and the event log's length it counts, for
/// readers that have no expert set (`report`). The checksum is verified.
pub fn read_state(path: &Path) -> Result<(Population, u64)> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let header = parse_header(&bytes, path)?;
    let md = &header.metadata;
    durable::verify(&bytes, &header, path, "checkpoint", coverage(md))?;
    let state = State::of(path, md)?;
    Ok((state.pop, state.events_len))
}

/// Version 1's checksum covers only the data; later ones cover the metadata too.
fn coverage(md: &BTreeMap<String, String>) -> Coverage {
    if md.get("version").map(String::as_str) == Some("1") {
        Coverage::DataOnly
    } else {
        Coverage::DataAndMetadata
    }
}

/// What a checkpoint's metadata records beside its genomes, once it is known to be one of ours
/// of a version this build reads.
struct State<'a> {
    pop: Population,
    events_len: u64,
    version: &'a str,
}

impl<'a> State<'a> {
    fn of(path: &Path, md: &'a BTreeMap<String, String>) -> Result<State<'a>> {
        let version = metadata(path, md, "version")?.as_str();
        if metadata(path, md, "format")? != FORMAT || !matches!(version, "1" | "2") {
            return Err(Error::format(
                path,
                "not a cycleqd-engine checkpoint of a version this build reads",
            ));
        }
        let pop: Population = serde_json::from_str(metadata(path, md, "state")?)
            .map_err(|e| Error::format(path, format!("invalid state: {e}")))?;
        Ok(State {
            pop,
            events_len: metadata_number(path, md, "events_len")?,
            version,
        })
    }
}

fn metadata<'a>(path: &Path, md: &'a BTreeMap<String, String>, k: &str) -> Result<&'a String> {
    md.get(k)
        .ok_or_else(|| Error::format(path, format!("checkpoint metadata has no `{k}`")))
}

fn metadata_number(path: &Path, md: &BTreeMap<String, String>, k: &str) -> Result<u64> {
    metadata(path, md, k)?
        .parse()
        .map_err(|_| Error::format(path, format!("`{k}` is not an integer")))
}

/// Loads a checkpoint written by [`save`] (or by version 1, whose checksum covers only the
/// data and which has nothing in flight) for the expert set `set`.
pub fn load(path: &Path, set: &ExpertSet) -> Result<(Population, CheckpointMeta)> {
    let (mut genomes, md) = read_genomes_covered(path, set, coverage)?;
    let State {
        mut pop,
        events_len,
        version,
    } = State::of(path, &md)?;
    let (next_child, mut in_flight) = if version == "1" {
        (pop.children_done + 1, vec![])
    } else {
        let specs: Vec<ChildSpec> = serde_json::from_str(metadata(path, &md, "in_flight")?)
            .map_err(|e| Error::format(path, format!("invalid `in_flight`: {e}")))?;
        (metadata_number(path, &md, "next_child")?, specs)
    };
    for spec in &mut in_flight {
        let g = genomes
            .remove(&format!("{IN_FLIGHT}{}", spec.id()))
            .ok_or_else(|| {
                Error::format(
                    path,
                    format!("child in flight `{}` has no genome", spec.id()),
                )
            })?;
        spec.genome = Arc::new(g);
    }
    pop.genomes = genomes.into_iter().map(|(k, g)| (k, Arc::new(g))).collect();
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
    if next_child != pop.children_done + in_flight.len() as u64 + 1
        || in_flight.iter().any(|s| s.child >= next_child)
    {
        return Err(Error::format(
            path,
            format!(
                "inconsistent counts: {} children applied, {} in flight, next child {next_child}",
                pop.children_done,
                in_flight.len()
            ),
        ));
    }
    Ok((
        pop,
        CheckpointMeta {
            events_len,
            config: metadata(path, &md, "config")?.clone(),
            next_child,
            in_flight,
        },
    ))
}
