//! The run as a library: a Rust caller drives CycleQD with its own workers. A worker that
//! panics or errs on a child costs that child (retried once on another worker), never the
//! run; the coordinator's batch schedule is indifferent to the order results arrive in, and a
//! resumed coordinator re-issues the children it had in flight.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{demo, set_key, with_evolution};
use cycleqd_engine::bench::scheduler::{demo_set, simulated_scores, SimulatedWorker};
use cycleqd_engine::eval::Scored;
use cycleqd_engine::evolve::{ExpertSet, Genome};
use cycleqd_engine::model::HostTensor;
use cycleqd_engine::qd::checkpoint;
use cycleqd_engine::qd::config::Granularity;
use cycleqd_engine::qd::cycle::coefficient_groups;
use cycleqd_engine::qd::{EliteSampling, Operators, Outcome, Population, RunConfig};
use cycleqd_engine::run::{
    plan_workers, Coordinator, CoordinatorConfig, Quiet, Report, Run, RunEnd, Schedule, Split,
    Stop, Told, Worker,
};

/// A real worker that fails as told: on children in `always` every time, on children in
/// `once` the first time any worker sees them (the set is shared).
struct Faulty {
    inner: Box<dyn Worker>,
    always: BTreeSet<String>,
    once: Arc<Mutex<BTreeSet<String>>>,
}

impl Worker for Faulty {
    fn name(&self) -> String {
        self.inner.name()
    }

    fn evaluate(
        &mut self,
        genome: &Genome,
        label: &str,
        race: Option<&cycleqd_engine::qd::RaceBounds>,
    ) -> cycleqd_engine::Result<Scored> {
        if self.always.contains(label) {
            panic!("injected panic on {label}");
        }
        if self.once.lock().unwrap().remove(label) {
            return Err(cycleqd_engine::Error::invalid(format!(
                "injected error on {label}"
            )));
        }
        self.inner.evaluate(genome, label, race)
    }

    fn score_tensors(
        &mut self,
        tensors: &[(String, HostTensor)],
        split: Split,
        label: &str,
    ) -> cycleqd_engine::Result<Scored> {
        self.inner.score_tensors(tensors, split, label)
    }
}

#[test]
fn a_failing_worker_costs_its_child_and_never_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let cfg_path = demo(dir.path(), |t| {
        with_evolution(set_key(t, "generations", "24"), "batch = 4")
    });
    let cfg = RunConfig::load(&cfg_path).unwrap();
    let out = dir.path().join("run");
    let devices = plan_workers(
        Some(2),
        Some(cycleqd_engine::backend::cuda::DeviceChoice::Cpu),
    )
    .unwrap();
    let mut run = Run::open(cfg, &out, devices, &mut Quiet).unwrap();
    let once = Arc::new(Mutex::new(BTreeSet::from(["child-9".to_string()])));
    let workers: Vec<Box<dyn Worker>> = run
        .workers()
        .unwrap()
        .into_iter()
        .map(|inner| {
            Box::new(Faulty {
                inner,
                always: BTreeSet::from(["child-7".to_string()]),
                once: once.clone(),
            }) as Box<dyn Worker>
        })
        .collect();
    let end = run
        .execute_with(workers, &Stop::default(), &mut Quiet)
        .unwrap();
    assert!(matches!(end, RunEnd::Finished(_)), "{end:?}");
    let events: Vec<serde_json::Value> = std::fs::read_to_string(out.join("events.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(events.len(), 24);
    for e in &events {
        let id = e["id"].as_str().unwrap();
        match id {
            // Panicked on both workers: failed, with both reasons.
            "child-7" => {
                let why = e["failed"].as_str().unwrap();
                assert!(
                    why.matches("injected panic on child-7").count() == 2,
                    "{why}"
                );
                assert!(why.contains("cpu:0") && why.contains("cpu:1"), "{why}");
                assert_eq!(e["attempts"], 2);
                assert!(e["scores"].is_null());
            }
            // Failed once, then scored on the other worker.
            "child-9" => {
                assert!(e["failed"].is_null() && e["scores"].is_array(), "{e}");
                assert_eq!(e["attempts"], 2);
            }
            _ => {
                assert!(e["failed"].is_null(), "{id}: {e}");
                assert_eq!(e["attempts"], 1);
            }
        }
    }
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["failed_children"], 1);
}

fn ops(set: &ExpertSet) -> Operators {
    let names: Vec<&str> = set.tensors.iter().map(|t| t.name.as_str()).collect();
    Operators {
        seed: 11,
        crossover_mean: 1.0,
        crossover_std: 0.01,
        groups: coefficient_groups(&names, Granularity::Model),
        mutation_w_max: 0.3,
        sampling: EliteSampling::Weighted {
            alpha_low: 0.5,
            alpha_high: 1.3,
        },
    }
}

fn coordinator(set: &Arc<ExpertSet>, out: &Path, schedule: Schedule, n: u64) -> Coordinator {
    let k = set.experts.len();
    let tasks = (0..k).map(|e| format!("t{e}")).collect();
    let fitness = (0..k)
        .map(|e| simulated_scores(&Genome::seed(set, e)))
        .collect();
    let pop = Population::new(set, tasks, &vec![(0.0, 1.0); k], 15, fitness).unwrap();
    let cfg = CoordinatorConfig {
        ops: ops(set),
        schedule,
        generations: n,
        checkpoint_every: 5,
        config_toml: "test".into(),
        racing: None,
    };
    std::fs::create_dir_all(out).unwrap();
    Coordinator::create(out, set.clone(), pop, cfg).unwrap()
}

fn report() -> Report {
    Report {
        worker: "test".into(),
        seconds: 0.0,
        attempts: 1,
    }
}

/// Asks everything available, tells it in the order `order` picks, until done.
fn run_out_of_order(c: &mut Coordinator, reverse: bool) {
    while !c.is_done() {
        let mut asked = vec![];
        while let Some(s) = c.ask().unwrap() {
            asked.push(s);
        }
        if reverse {
            asked.reverse();
        }
        for s in asked {
            let told = c
                .tell(
                    s.child,
                    Outcome::Scored(simulated_scores(&s.genome).into()),
                    report(),
                )
                .unwrap();
            assert!(matches!(told, Told::Applied(_)));
        }
    }
    c.checkpoint().unwrap();
}

#[test]
fn batch_archives_do_not_depend_on_the_order_results_arrive_in() {
    let scratch = tempfile::tempdir().unwrap();
    let set = Arc::new(demo_set(&scratch.path().join("demo")).unwrap());
    let (a, b) = (scratch.path().join("a"), scratch.path().join("b"));
    let mut in_order = coordinator(&set, &a, Schedule::Batch(6), 60);
    run_out_of_order(&mut in_order, false);
    let mut reversed = coordinator(&set, &b, Schedule::Batch(6), 60);
    run_out_of_order(&mut reversed, true);
    let (pa, pb) = (in_order.population(), reversed.population());
    assert_eq!(pa.children_done, 60);
    assert_eq!(
        serde_json::to_string(&pa.archives).unwrap(),
        serde_json::to_string(&pb.archives).unwrap()
    );
    assert_eq!(pa.genomes, pb.genomes);
    assert_eq!(
        std::fs::read(a.join("events.jsonl")).unwrap(),
        std::fs::read(b.join("events.jsonl")).unwrap()
    );
}

#[test]
fn late_and_duplicate_results_are_ignored_and_a_resume_reissues_children_in_flight() {
    let scratch = tempfile::tempdir().unwrap();
    let set = Arc::new(demo_set(&scratch.path().join("demo")).unwrap());
    let out = scratch.path().join("run");
    let mut c = coordinator(&set, &out, Schedule::Batch(4), 12);
    let batch: Vec<_> = (0..4).map(|_| c.ask().unwrap().unwrap()).collect();
    assert!(
        c.ask().unwrap().is_none(),
        "the next batch waits for this one"
    );
    // Child 2 arrives first: held until child 1 is applied.
    let scores =
        |s: &cycleqd_engine::qd::ChildSpec| Outcome::Scored(simulated_scores(&s.genome).into());
    match c.tell(2, scores(&batch[1]), report()).unwrap() {
        Told::Applied(ev) => assert!(ev.is_empty()),
        Told::Duplicate => panic!("child 2 is in flight"),
    }
    match c.tell(1, scores(&batch[0]), report()).unwrap() {
        Told::Applied(ev) => assert_eq!(ev.iter().map(|e| e.child).collect::<Vec<_>>(), [1, 2]),
        Told::Duplicate => panic!("child 1 is in flight"),
    }
    assert!(matches!(
        c.tell(1, scores(&batch[0]), report()).unwrap(),
        Told::Duplicate
    ));
    assert!(matches!(
        c.tell(99, scores(&batch[0]), report()).unwrap(),
        Told::Duplicate
    ));
    c.checkpoint().unwrap();
    drop(c);

    // Resumed: children 3 and 4 are in flight and handed out again, first.
    let (pop, meta) = checkpoint::load(&out.join("checkpoint.safetensors"), &set).unwrap();
    assert_eq!(pop.children_done, 2);
    assert_eq!(meta.next_child, 5);
    assert_eq!(
        meta.in_flight.iter().map(|s| s.child).collect::<Vec<_>>(),
        [3, 4]
    );
    assert_eq!(*meta.in_flight[0].genome, *batch[2].genome);
    let cfg = CoordinatorConfig {
        ops: ops(&set),
        schedule: Schedule::Batch(4),
        generations: 12,
        checkpoint_every: 5,
        config_toml: "test".into(),
        racing: None,
    };
    let mut r = Coordinator::resume(&out, set.clone(), pop, meta, cfg).unwrap();
    let again: Vec<u64> = std::iter::from_fn(|| r.ask().unwrap())
        .map(|s| s.child)
        .collect();
    assert_eq!(again, [3, 4]);
    // A late result of child 1 (told before the checkpoint) changes nothing.
    assert!(matches!(
        r.tell(1, scores(&batch[0]), report()).unwrap(),
        Told::Duplicate
    ));
    r.tell(4, scores(&batch[3]), report()).unwrap();
    r.tell(3, scores(&batch[2]), report()).unwrap();
    assert_eq!(r.population().children_done, 4);
    assert_eq!(r.ask().unwrap().unwrap().child, 5);
}

#[test]
fn an_edited_checkpoint_is_refused() {
    let scratch = tempfile::tempdir().unwrap();
    let set = Arc::new(demo_set(&scratch.path().join("demo")).unwrap());
    let out = scratch.path().join("run");
    let mut c = coordinator(&set, &out, Schedule::Steady, 10);
    run_out_of_order(&mut c, false);
    drop(c);
    let path = out.join("checkpoint.safetensors");
    let mut bytes = std::fs::read(&path).unwrap();
    // The child counter in the metadata (JSON inside the header's JSON), 10 → 90: the
    // checksum covers it.
    let key = br#"children_done\":10"#;
    let at = bytes.windows(key.len()).position(|w| w == key).unwrap();
    bytes[at + key.len() - 2] = b'9';
    std::fs::write(&path, &bytes).unwrap();
    let e = checkpoint::load(&path, &set).unwrap_err().to_string();
    assert!(
        e.contains("checksum") && e.contains("checkpoint.safetensors"),
        "{e}"
    );
}

#[test]
fn a_simulated_fleet_finishes_a_steady_run_with_every_worker_busy() {
    let scratch = tempfile::tempdir().unwrap();
    let set = Arc::new(demo_set(&scratch.path().join("demo")).unwrap());
    let out = scratch.path().join("run");
    let mut c = coordinator(&set, &out, Schedule::Steady, 40);
    let fleet: Vec<Box<dyn Worker>> = (0..4)
        .map(|i| {
            Box::new(SimulatedWorker {
                name: format!("sim:{i}"),
                hold: Duration::from_millis(2),
            }) as Box<dyn Worker>
        })
        .collect();
    let driven = cycleqd_engine::run::drive(&mut c, fleet, &Stop::default(), &mut |_| {}).unwrap();
    assert!(c.is_done());
    assert_eq!(driven.workers.len(), 4);
    assert_eq!(driven.stats.results, 40);
    assert!(
        driven.stats.busy_seconds.iter().all(|&b| b > 0.0),
        "every worker ran children"
    );
}

#[test]
fn a_quality_archive_that_cannot_breed_borrows_the_fullest_archives_parents() {
    let scratch = tempfile::tempdir().unwrap();
    let set = Arc::new(demo_set(&scratch.path().join("demo")).unwrap());
    // Archive 0's measures are tasks 1 and 2, equal for every expert: its three experts share
    // one cell, so it holds one elite; archives 1 and 2 hold three.
    let fitness = vec![
        vec![0.9, 0.5, 0.5],
        vec![0.2, 0.5, 0.5],
        vec![0.1, 0.5, 0.5],
    ];
    let tasks = vec!["a".to_string(), "b".to_string(), "c".to_string()];
    let pop = Population::new(&set, tasks, &[(0.0, 1.0); 3], 15, fitness).unwrap();
    assert_eq!(pop.archives[0].len(), 1);
    let spec = pop.breed(1, &set, &ops(&set)).unwrap();
    assert_eq!(spec.quality_task, 0);
    assert_ne!(
        spec.parents_from, 0,
        "parents come from an archive that can breed"
    );
    assert_eq!(
        pop.archives[spec.parents_from].len(),
        (0..3).map(|a| pop.archives[a].len()).max().unwrap()
    );
    assert_ne!(spec.parents[0], spec.parents[1]);
}
