//! MAP-Elites grid archives in pyribs' vocabulary (`GridArchive`, `add` → `AddStatus`,
//! `stats`), with CycleQD's binning and elite sampling (Kuroki et al., ICLR 2025, §3.2; and the
//! official code's defaults, see `cycleqd.md` §2–3).
//!
//! One archive per task: the objective is that task's score, the measures are the other tasks'
//! scores, each binned into `B` equal bins over `[lo, hi]`, right-inclusive:
//! bin `i` is `(lo + iΔ, lo + (i+1)Δ]`, `x ≤ lo` → 0, `x > hi` → `B − 1`.

use std::collections::BTreeMap;

use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// What `add` did, as pyribs names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AddStatus {
    NotAdded,
    ImproveExisting,
    New,
}

/// An occupied cell.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Elite<S> {
    pub solution: S,
    pub objective: f64,
    pub measures: Vec<f64>,
    /// Bin index per measure.
    pub cell: Vec<usize>,
}

/// pyribs' archive statistics.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ArchiveStats {
    pub num_elites: usize,
    /// Occupied cells ÷ all cells.
    pub coverage: f64,
    /// Σ (objective − qd_offset) over elites.
    pub qd_score: f64,
    pub obj_max: Option<f64>,
    pub obj_mean: Option<f64>,
}

/// A grid archive over `ranges.len()` measures with `bins` bins each.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GridArchive<S> {
    bins: usize,
    ranges: Vec<(f64, f64)>,
    qd_offset: f64,
    /// Inner bin edges per measure (`linspace(lo, hi, bins + 1)[1..bins]`).
    edges: Vec<Vec<f64>>,
    /// Occupied cells by flat index (row-major over measures).
    cells: BTreeMap<usize, Elite<S>>,
}

impl<S: Clone> GridArchive<S> {
    /// `bins` per measure over `ranges` (`lo < hi` each); `qd_offset` is subtracted from each
    /// objective in `qd_score` (pyribs' offset, so that scores below it do not count).
    pub fn new(bins: usize, ranges: Vec<(f64, f64)>, qd_offset: f64) -> Result<Self> {
        if bins == 0 {
            return Err(Error::invalid("archive bins must be at least 1"));
        }
        for (d, &(lo, hi)) in ranges.iter().enumerate() {
            if !(lo.is_finite() && hi.is_finite() && lo < hi) {
                return Err(Error::invalid(format!(
                    "archive measure {d}: range [{lo}, {hi}] needs finite lo < hi"
                )));
            }
        }
        let edges = ranges
            .iter()
            .map(|&(lo, hi)| {
                let step = (hi - lo) / bins as f64;
                (1..bins).map(|i| lo + step * i as f64).collect()
            })
            .collect();
        Ok(GridArchive {
            bins,
            ranges,
            qd_offset,
            edges,
            cells: BTreeMap::new(),
        })
    }

    /// The paper's range for a measure: 85% of the weakest expert's score to 115% of the
    /// strongest's.
    /// An empty archive with the same grid, for solutions of any type.
    pub fn empty_like<T: Clone>(&self) -> GridArchive<T> {
        GridArchive {
            bins: self.bins,
            ranges: self.ranges.clone(),
            qd_offset: self.qd_offset,
            edges: self.edges.clone(),
            cells: BTreeMap::new(),
        }
    }

    /// The same cells and objectives without the solutions (what a raced evaluation must
    /// beat).
    pub fn objectives(&self) -> GridArchive<()> {
        GridArchive {
            bins: self.bins,
            ranges: self.ranges.clone(),
            qd_offset: self.qd_offset,
            edges: self.edges.clone(),
            cells: self
                .cells
                .iter()
                .map(|(k, e)| {
                    (
                        *k,
                        Elite {
                            solution: (),
                            objective: e.objective,
                            measures: e.measures.clone(),
                            cell: e.cell.clone(),
                        },
                    )
                })
                .collect(),
        }
    }

    /// Whether a solution with objective at most `upper` and each measure `d` within
    /// `measures[d]` could be added: some cell those measures may fall in is empty, or holds
    /// an elite below `upper`.
    pub fn could_improve(&self, upper: f64, measures: &[(f64, f64)]) -> bool {
        let span = self.span(measures);
        let cells: u128 = span.iter().map(|&(l, h)| (h - l + 1) as u128).product();
        let mut held = 0u128;
        for e in self.cells.values() {
            if e.cell
                .iter()
                .zip(&span)
                .all(|(c, &(l, h))| *c >= l && *c <= h)
            {
                if upper > e.objective {
                    return true;
                }
                held += 1;
            }
        }
        held < cells
    }

    /// Whether a solution with objective at least `lower` and each measure `d` within
    /// `measures[d]` would be added wherever in that box it lands: every cell of the box is
    /// empty or holds an elite below `lower`.
    pub fn surely_improves(&self, lower: f64, measures: &[(f64, f64)]) -> bool {
        let span = self.span(measures);
        self.cells.values().all(|e| {
            let inside = e
                .cell
                .iter()
                .zip(&span)
                .all(|(c, &(l, h))| *c >= l && *c <= h);
            !inside || lower > e.objective
        })
    }

    /// The bins each measure's interval covers.
    fn span(&self, measures: &[(f64, f64)]) -> Vec<(usize, usize)> {
        measures
            .iter()
            .enumerate()
            .map(|(d, &(lo, hi))| (self.bin(d, lo), self.bin(d, hi)))
            .collect()
    }

    pub fn paper_range(expert_scores: &[f64]) -> (f64, f64) {
        let min = expert_scores.iter().copied().fold(f64::INFINITY, f64::min);
        let max = expert_scores
            .iter()
            .copied()
            .fold(f64::NEG_INFINITY, f64::max);
        (0.85 * min, 1.15 * max)
    }

    pub fn measure_dims(&self) -> usize {
        self.ranges.len()
    }

    /// Each measure's `(lo, hi)`.
    pub fn ranges(&self) -> &[(f64, f64)] {
        &self.ranges
    }

    pub fn bins(&self) -> usize {
        self.bins
    }

    /// Total number of cells, `bins ^ dims`.
    pub fn cells_total(&self) -> usize {
        self.bins.saturating_pow(self.ranges.len() as u32)
    }

    /// The bin of `x` along measure `d`.
    pub fn bin(&self, d: usize, x: f64) -> usize {
        // Count the inner edges strictly below x: right-inclusive bins, clamped at both ends.
        self.edges[d].iter().filter(|&&e| x > e).count()
    }

    /// Bin indices of a measures vector.
    pub fn cell_of(&self, measures: &[f64]) -> Result<Vec<usize>> {
        if measures.len() != self.ranges.len() {
            return Err(Error::invalid(format!(
                "archive has {} measures, got {}",
                self.ranges.len(),
                measures.len()
            )));
        }
        if let Some(x) = measures.iter().find(|x| x.is_nan()) {
            return Err(Error::invalid(format!("measure {x} is not a number")));
        }
        Ok(measures
            .iter()
            .enumerate()
            .map(|(d, &x)| self.bin(d, x))
            .collect())
    }

    fn flat(&self, cell: &[usize]) -> usize {
        cell.iter().fold(0, |acc, &c| acc * self.bins + c)
    }

    /// Offers a solution: it takes its cell if the cell is empty or its objective is
    /// strictly greater than the elite's.
    pub fn add(&mut self, solution: S, objective: f64, measures: &[f64]) -> Result<AddStatus> {
        Ok(self.insert(solution, objective, measures)?.0)
    }

    /// [`GridArchive::add`], also returning the elite it displaced, if any.
    pub fn insert(
        &mut self,
        solution: S,
        objective: f64,
        measures: &[f64],
    ) -> Result<(AddStatus, Option<S>)> {
        if objective.is_nan() {
            return Err(Error::invalid("objective is not a number"));
        }
        let cell = self.cell_of(measures)?;
        let key = self.flat(&cell);
        let status = match self.cells.get(&key) {
            None => AddStatus::New,
            Some(e) if objective > e.objective => AddStatus::ImproveExisting,
            Some(_) => return Ok((AddStatus::NotAdded, None)),
        };
        let old = self.cells.insert(
            key,
            Elite {
                solution,
                objective,
                measures: measures.to_vec(),
                cell,
            },
        );
        Ok((status, old.map(|e| e.solution)))
    }

    /// Elites in cell order.
    pub fn elites(&self) -> impl Iterator<Item = &Elite<S>> {
        self.cells.values()
    }

    pub fn len(&self) -> usize {
        self.cells.len()
    }

    pub fn is_empty(&self) -> bool {
        self.cells.is_empty()
    }

    /// The elite with the highest objective (the first in cell order on ties).
    pub fn best(&self) -> Option<&Elite<S>> {
        self.cells
            .values()
            .fold(None, |best: Option<&Elite<S>>, e| match best {
                Some(b) if b.objective >= e.objective => Some(b),
                _ => Some(e),
            })
    }

    pub fn stats(&self) -> ArchiveStats {
        let n = self.cells.len();
        let objs = self.cells.values().map(|e| e.objective);
        ArchiveStats {
            num_elites: n,
            coverage: n as f64 / self.cells_total() as f64,
            qd_score: objs.clone().map(|o| o - self.qd_offset).sum(),
            obj_max: objs.clone().reduce(f64::max),
            obj_mean: (n > 0).then(|| objs.sum::<f64>() / n as f64),
        }
    }
}

/// How parents are drawn from the active archive.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub enum EliteSampling {
    /// Uniform over occupied cells (the ablation).
    Uniform,
    /// CycleQD's elite sampling: each elite weighted by the product of its objective and its
    /// measure-bin indices, each min-max normalised onto `[alpha_low, alpha_high]`. The official
    /// code's form is `[0.5, 1.3]` (the default), the paper's `[0.5, 0.8]`.
    Weighted { alpha_low: f64, alpha_high: f64 },
}

impl Default for EliteSampling {
    fn default() -> Self {
        EliteSampling::CODE
    }
}

impl EliteSampling {
    pub const CODE: EliteSampling = EliteSampling::Weighted {
        alpha_low: 0.5,
        alpha_high: 1.3,
    };
    pub const PAPER: EliteSampling = EliteSampling::Weighted {
        alpha_low: 0.5,
        alpha_high: 0.8,
    };

    /// Selection probability of each elite of `archive`, in [`GridArchive::elites`] order.
    pub fn probabilities<S: Clone>(&self, archive: &GridArchive<S>) -> Vec<f64> {
        let n = archive.len();
        let uniform = vec![1.0 / n as f64; n];
        let EliteSampling::Weighted {
            alpha_low,
            alpha_high,
        } = *self
        else {
            return uniform;
        };
        let norm = |v: Vec<f64>| -> Vec<f64> {
            let min = v.iter().copied().fold(f64::INFINITY, f64::min);
            let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            if max == min {
                return vec![1.0; v.len()];
            }
            v.iter()
                .map(|x| alpha_low + (x - min) * (alpha_high - alpha_low) / (max - min))
                .collect()
        };
        let mut w = norm(archive.elites().map(|e| e.objective).collect());
        for d in 0..archive.measure_dims() {
            let nd = norm(archive.elites().map(|e| e.cell[d] as f64).collect());
            w.iter_mut().zip(nd).for_each(|(w, x)| *w *= x);
        }
        let total: f64 = w.iter().sum();
        if total > 0.0 {
            w.iter().map(|x| x / total).collect()
        } else {
            uniform
        }
    }

    /// Two distinct parents (indices into [`GridArchive::elites`] order): the first from the
    /// probabilities, the second from them renormalised without the first.
    pub fn sample_pair<S: Clone>(
        &self,
        archive: &GridArchive<S>,
        rng: &mut impl Rng,
    ) -> Result<(usize, usize)> {
        if archive.len() < 2 {
            return Err(Error::invalid(format!(
                "an archive with {} elite(s) cannot breed (needs 2)",
                archive.len()
            )));
        }
        let p = self.probabilities(archive);
        let first = draw(&p, None, rng);
        let second = draw(&p, Some(first), rng);
        Ok((first, second))
    }
}

/// Inverse-CDF draw from `p`, optionally excluding one index (renormalising the rest).
fn draw(p: &[f64], exclude: Option<usize>, rng: &mut impl Rng) -> usize {
    let total: f64 = p
        .iter()
        .enumerate()
        .filter(|(i, _)| Some(*i) != exclude)
        .map(|(_, x)| x)
        .sum();
    let mut u = rng.random::<f64>() * total;
    let mut last = 0;
    for (i, &x) in p.iter().enumerate() {
        if Some(i) == exclude {
            continue;
        }
        last = i;
        if u < x {
            return i;
        }
        u -= x;
    }
    last
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    use super::*;

    #[test]
    fn could_improve_sees_empty_cells_and_weaker_elites_in_the_box() {
        let mut a = GridArchive::new(4, vec![(0.0, 1.0)], 0.0).unwrap();
        // Cells (0, 0.25], (0.25, 0.5], (0.5, 0.75], (0.75, 1].
        a.add(1u8, 0.6, &[0.1]).unwrap();
        a.add(2u8, 0.3, &[0.4]).unwrap();
        // Only cell 0, held at 0.6: an objective up to 0.6 cannot beat it, above can.
        assert!(!a.could_improve(0.6, &[(0.0, 0.2)]));
        assert!(a.could_improve(0.61, &[(0.0, 0.2)]));
        // Cells 0 and 1: the elite at 0.3 can be beaten by 0.5.
        assert!(a.could_improve(0.5, &[(0.1, 0.4)]));
        assert!(!a.could_improve(0.3, &[(0.1, 0.4)]));
        // Cell 2 is empty: anything may enter.
        assert!(a.could_improve(0.0, &[(0.3, 0.6)]));
        let o = a.objectives();
        assert_eq!(o.len(), 2);
        assert!(!o.could_improve(0.3, &[(0.1, 0.4)]));
    }

    #[test]
    fn surely_improves_needs_every_cell_of_the_box_beaten_or_empty() {
        let mut a = GridArchive::new(4, vec![(0.0, 1.0)], 0.0).unwrap();
        a.add(1u8, 0.6, &[0.1]).unwrap();
        a.add(2u8, 0.3, &[0.4]).unwrap();
        // Cells 2 and 3 are empty: anything lands in an empty cell.
        assert!(a.surely_improves(0.0, &[(0.6, 0.9)]));
        // Cells 1 and 2: beats 0.3 only above it (equal is not better).
        assert!(a.surely_improves(0.31, &[(0.3, 0.6)]));
        assert!(!a.surely_improves(0.3, &[(0.3, 0.6)]));
        // Cells 0–1: must beat 0.6 too.
        assert!(!a.surely_improves(0.5, &[(0.1, 0.4)]));
        assert!(a.surely_improves(0.61, &[(0.1, 0.4)]));
        // Whatever is sure to improve could improve.
        for (lower, box_) in [(0.0, (0.6, 0.9)), (0.31, (0.3, 0.6)), (0.61, (0.1, 0.4))] {
            assert!(a.could_improve(lower, &[box_]));
        }
    }

    #[test]
    fn bins_are_right_inclusive_and_clamped() {
        let a = GridArchive::<u32>::new(15, vec![(0.0, 0.45)], 0.0).unwrap();
        let step = 0.45 / 15.0;
        assert_eq!(a.bin(0, -1.0), 0);
        assert_eq!(a.bin(0, 0.0), 0);
        assert_eq!(a.bin(0, step), 0, "an edge belongs to the bin below it");
        assert_eq!(a.bin(0, step + 1e-12), 1);
        assert_eq!(a.bin(0, 7.0 * step), 6);
        assert_eq!(a.bin(0, 0.45), 14);
        assert_eq!(a.bin(0, 0.9), 14);
        assert!(GridArchive::<u32>::new(15, vec![(0.5, 0.5)], 0.0).is_err());
        assert!(a.cell_of(&[f64::NAN]).is_err());
    }

    #[test]
    fn replacement_is_strict_and_stats_follow_pyribs() {
        let mut a = GridArchive::new(4, vec![(0.0, 1.0), (0.0, 1.0)], -1.0).unwrap();
        assert_eq!(a.add("a", 0.5, &[0.1, 0.9]).unwrap(), AddStatus::New);
        assert_eq!(
            a.add("b", 0.5, &[0.2, 0.8]).unwrap(),
            AddStatus::NotAdded,
            "equal is not better"
        );
        assert_eq!(
            a.add("c", 0.6, &[0.2, 0.8]).unwrap(),
            AddStatus::ImproveExisting
        );
        assert_eq!(a.add("d", 0.2, &[0.9, 0.1]).unwrap(), AddStatus::New);
        let s = a.stats();
        assert_eq!(s.num_elites, 2);
        assert_eq!(s.coverage, 2.0 / 16.0);
        assert!((s.qd_score - (1.6 + 1.2)).abs() < 1e-12);
        assert_eq!(s.obj_max, Some(0.6));
        assert!((s.obj_mean.unwrap() - 0.4).abs() < 1e-12);
        assert_eq!(a.best().unwrap().solution, "c");
        let json = serde_json::to_string(&a).unwrap();
        let back: GridArchive<String> = serde_json::from_str(&json).unwrap();
        assert_eq!(back.stats(), a.stats());
        assert_eq!(
            GridArchive::<u8>::new(2, vec![(0.0, 1.0)], 0.0)
                .unwrap()
                .stats()
                .obj_max,
            None
        );
    }

    fn example() -> GridArchive<usize> {
        let mut a = GridArchive::new(5, vec![(0.0, 1.0), (0.0, 1.0)], 0.0).unwrap();
        for (i, (q, m0, m1)) in [
            (0.9, 0.1, 0.3),
            (0.5, 0.7, 0.2),
            (0.7, 0.95, 0.9),
            (0.1, 0.5, 0.5),
        ]
        .into_iter()
        .enumerate()
        {
            a.add(i, q, &[m0, m1]).unwrap();
        }
        a
    }

    #[test]
    fn weighted_probabilities_follow_the_formula() {
        let a = example();
        // Elites in cell order: recompute the weights by hand from their objectives and bins.
        let es: Vec<&Elite<usize>> = a.elites().collect();
        let norm = |v: &[f64], lo: f64, hi: f64| -> Vec<f64> {
            let (mn, mx) = (
                v.iter().copied().fold(f64::MAX, f64::min),
                v.iter().copied().fold(f64::MIN, f64::max),
            );
            v.iter()
                .map(|x| lo + (x - mn) * (hi - lo) / (mx - mn))
                .collect()
        };
        for (form, lo, hi) in [
            (EliteSampling::CODE, 0.5, 1.3),
            (EliteSampling::PAPER, 0.5, 0.8),
        ] {
            let q = norm(&es.iter().map(|e| e.objective).collect::<Vec<_>>(), lo, hi);
            let c0 = norm(
                &es.iter().map(|e| e.cell[0] as f64).collect::<Vec<_>>(),
                lo,
                hi,
            );
            let c1 = norm(
                &es.iter().map(|e| e.cell[1] as f64).collect::<Vec<_>>(),
                lo,
                hi,
            );
            let w: Vec<f64> = (0..4).map(|j| q[j] * c0[j] * c1[j]).collect();
            let t: f64 = w.iter().sum();
            let p = form.probabilities(&a);
            for j in 0..4 {
                assert!((p[j] - w[j] / t).abs() < 1e-12, "{form:?}");
            }
        }
        assert_eq!(EliteSampling::Uniform.probabilities(&a), vec![0.25; 4]);
    }

    #[test]
    fn empirical_pair_frequencies_match_probabilities() {
        let a = example();
        for form in [
            EliteSampling::CODE,
            EliteSampling::PAPER,
            EliteSampling::Uniform,
        ] {
            let p = form.probabilities(&a);
            let mut rng = ChaCha8Rng::seed_from_u64(42);
            let draws = 100_000;
            let (mut first, mut second) = (vec![0usize; 4], vec![0usize; 4]);
            for _ in 0..draws {
                let (i, j) = form.sample_pair(&a, &mut rng).unwrap();
                assert_ne!(i, j);
                first[i] += 1;
                second[j] += 1;
            }
            for k in 0..4 {
                // P(second = k) = Σ_{i≠k} p_i · p_k / (1 − p_i).
                let p2: f64 = (0..4)
                    .filter(|&i| i != k)
                    .map(|i| p[i] * p[k] / (1.0 - p[i]))
                    .sum();
                for (count, want) in [(first[k], p[k]), (second[k], p2)] {
                    let sigma = (want * (1.0 - want) / draws as f64).sqrt();
                    let got = count as f64 / draws as f64;
                    assert!(
                        (got - want).abs() < 5.0 * sigma,
                        "{form:?} elite {k}: {got} vs {want}"
                    );
                }
            }
        }
        let mut one = GridArchive::new(3, vec![(0.0, 1.0)], 0.0).unwrap();
        one.add(0u8, 1.0, &[0.5]).unwrap();
        assert!(EliteSampling::CODE
            .sample_pair(&one, &mut ChaCha8Rng::seed_from_u64(1))
            .is_err());
    }
}
