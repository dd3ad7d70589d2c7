//! What a raced child must beat, decided from the archives it was bred from: for each archive,
//! could a child whose final scores lie in given intervals land in a cell that is empty or
//! held by a weaker elite? If no archive could take it, the child's evaluation stops early
//! (`eval::racing` scores the examples in rounds and builds the intervals).
//!
//! The archives are those the child was bred from (in batch mode, the snapshot its whole batch
//! was bred from), so the decision does not depend on timing or on how many workers run: a
//! batch's later children are applied to archives that only improved, so what could not enter
//! the snapshot cannot enter them either. A child that enters an archive was scored on every
//! example: archive contents are exact scores, never estimates.

use serde::{Deserialize, Serialize};

use super::archive::GridArchive;
use super::cycle::Population;
use crate::eval::RaceDecision;

/// How a run races (the resolved `evaluation = "racing"` settings).
#[derive(Clone, Debug, PartialEq)]
pub struct RacingConfig {
    /// Per task: raced (a built-in task set to racing), or scored whole.
    pub raced: Vec<bool>,
    /// Examples per raced task in the first round.
    pub batch: usize,
    /// Each round's growth over the one before (`racing_growth`).
    pub growth: f64,
    /// Probability that a stopped child could in fact have entered an archive is at most
    /// `1 − confidence` (per child).
    pub confidence: f64,
    /// Seed of the examples' order.
    pub seed: u64,
    /// The most rounds any raced task takes (`eval::racing::rounds`).
    pub rounds: usize,
}

impl RacingConfig {
    /// The miscoverage of one task's interval at one round: `1 − confidence` split over every
    /// raced task and every round a decision may look (Bonferroni), so that the chance any
    /// interval a stop relied on was wrong is at most `1 − confidence`.
    pub fn delta(&self) -> f64 {
        let tasks = self.raced.iter().filter(|&&r| r).count().max(1);
        (1.0 - self.confidence) / (tasks * self.rounds.max(1)) as f64
    }

    /// The bounds of a child bred from `pop` as it is.
    pub fn bounds(&self, pop: &Population) -> RaceBounds {
        RaceBounds {
            batch: self.batch,
            growth: self.growth,
            seed: self.seed,
            delta: self.delta(),
            raced: self.raced.clone(),
            archives: pop.archives.iter().map(|a| a.objectives()).collect(),
        }
    }
}

/// A raced child's evaluation settings and the archives it must beat.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RaceBounds {
    pub batch: usize,
    /// Round growth; bounds written before it existed raced in equal rounds.
    #[serde(default = "equal_rounds")]
    pub growth: f64,
    pub seed: u64,
    /// Miscoverage of each task's interval.
    pub delta: f64,
    pub raced: Vec<bool>,
    /// Per archive, in task order: its cells' objectives.
    pub archives: Vec<GridArchive<()>>,
}

fn equal_rounds() -> f64 {
    1.0
}

impl RaceBounds {
    /// What racing does next for a child whose final score on each task lies in
    /// `intervals`: stop when no archive could take it, finish in one round when some archive
    /// takes it wherever in the intervals it lands (it will be scored whole anyway; more
    /// rounds would only cost smaller generation passes), else go on.
    pub fn decide(&self, intervals: &[(f64, f64)]) -> RaceDecision {
        if !self.could_enter(intervals) {
            RaceDecision::Stop
        } else if self.must_enter(intervals) {
            RaceDecision::Finish
        } else {
            RaceDecision::Continue
        }
    }

    /// Whether a child whose final scores lie in `intervals` enters some archive wherever in
    /// them it lands.
    pub fn must_enter(&self, intervals: &[(f64, f64)]) -> bool {
        self.archives
            .iter()
            .enumerate()
            .any(|(q, a)| a.surely_improves(intervals[q].0, &measures_of(intervals, q)))
    }

    /// Whether a child whose final score on each task lies in `intervals` could enter some
    /// archive (archive `q`'s objective is task `q`, its measures the other tasks).
    pub fn could_enter(&self, intervals: &[(f64, f64)]) -> bool {
        self.archives
            .iter()
            .enumerate()
            .any(|(q, a)| a.could_improve(intervals[q].1, &measures_of(intervals, q)))
    }
}

/// Archive `q`'s measures: every task's interval but its own.
fn measures_of(intervals: &[(f64, f64)], q: usize) -> Vec<(f64, f64)> {
    intervals
        .iter()
        .enumerate()
        .filter(|&(d, _)| d != q)
        .map(|(_, &iv)| iv)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bounds(archives: Vec<GridArchive<()>>) -> RaceBounds {
        RaceBounds {
            batch: 8,
            growth: 2.0,
            seed: 0,
            delta: 0.01,
            raced: vec![true, true],
            archives,
        }
    }

    #[test]
    fn a_child_could_enter_while_any_archive_could_take_it() {
        // Two tasks: archive 0 (objective task 0, measure task 1) and archive 1.
        let mut a0 = GridArchive::new(2, vec![(0.0, 1.0)], 0.0).unwrap();
        let mut a1 = GridArchive::new(2, vec![(0.0, 1.0)], 0.0).unwrap();
        for (o, m) in [(0.8, 0.2), (0.7, 0.9)] {
            a0.add((), o, &[m]).unwrap();
        }
        for (o, m) in [(0.9, 0.3), (0.9, 0.8)] {
            a1.add((), o, &[m]).unwrap();
        }
        let b = bounds(vec![a0, a1]);
        // Task 0 at most 0.6, task 1 at most 0.5: beats nothing anywhere.
        assert!(!b.could_enter(&[(0.1, 0.6), (0.2, 0.5)]));
        // Task 0 could reach 0.75 with task 1 in the high cell (held at 0.7).
        assert!(b.could_enter(&[(0.1, 0.75), (0.6, 0.9)]));
        // Task 1 could reach 0.95 (beats 0.9 in archive 1).
        assert!(b.could_enter(&[(0.1, 0.6), (0.2, 0.95)]));
        // An empty archive takes anything.
        let empty = GridArchive::<()>::new(2, vec![(0.0, 1.0)], 0.0).unwrap();
        assert!(bounds(vec![empty.clone(), empty]).could_enter(&[(0.0, 0.0), (0.0, 0.0)]));
        // The decisions: no archive → stop; task 1 at least 0.95 beats both cells of
        // archive 1 → finish; could but need not → go on.
        assert_eq!(b.decide(&[(0.1, 0.6), (0.2, 0.5)]), RaceDecision::Stop);
        assert_eq!(b.decide(&[(0.1, 0.6), (0.95, 0.99)]), RaceDecision::Finish);
        assert_eq!(b.decide(&[(0.1, 0.6), (0.5, 0.95)]), RaceDecision::Continue);
        // Task 0 in [0.75, 0.85] with task 1 only in the low cell (held at 0.8): may or may
        // not beat it; from 0.81 up it surely does.
        assert_eq!(
            b.decide(&[(0.75, 0.85), (0.1, 0.3)]),
            RaceDecision::Continue
        );
        assert_eq!(b.decide(&[(0.81, 0.9), (0.1, 0.3)]), RaceDecision::Finish);
    }

    #[test]
    fn the_confidence_is_split_over_tasks_and_rounds() {
        let c = RacingConfig {
            raced: vec![true, false, true],
            batch: 16,
            growth: 2.0,
            confidence: 0.95,
            seed: 1,
            rounds: 4,
        };
        assert!((c.delta() - 0.05 / 8.0).abs() < 1e-15);
    }
}
