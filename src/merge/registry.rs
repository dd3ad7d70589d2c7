//! The merge methods `merge` knows, with mergekit's names, parameters, scopes and defaults.

/// Where a parameter is read from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// One value per tensor: top-level or slice `parameters`.
    Shared,
    /// One value per input model, the base included.
    Input,
    /// One value per input model other than the base.
    NonBase,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Float,
    Bool,
    Int,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Fallback {
    /// The merge refuses to run without it.
    Required,
    Value(f64),
    /// Optional, with no value (passthrough's `scale`).
    Absent,
}

#[derive(Clone, Copy, Debug)]
pub struct Param {
    pub name: &'static str,
    pub scope: Scope,
    pub kind: Kind,
    pub default: Fallback,
}

/// What a method does with `base_model`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BaseRole {
    Required,
    /// Used when given (task vectors over it), else the models themselves.
    Optional,
    /// Not special: when given it is one more input.
    Ignored,
}

/// The family a method's tensors are merged by.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    Linear,
    /// Generalised task arithmetic: sparsification and sign consensus.
    Gta {
        sparsify: GtaSparsify,
        consensus: bool,
    },
    Slerp,
    Nuslerp,
    Multislerp,
    Karcher,
    ModelStock,
    Sce,
    Passthrough,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GtaSparsify {
    None,
    Magnitude,
    Random,
    Outliers,
    Della,
}

#[derive(Debug)]
pub struct Method {
    pub name: &'static str,
    pub family: Family,
    pub base: BaseRole,
    pub params: &'static [Param],
    /// Inputs besides the base (all inputs when the base role is `Ignored`).
    pub min_models: usize,
    pub max_models: Option<usize>,
}

impl Method {
    pub fn param(&self, name: &str) -> Option<&Param> {
        self.params.iter().find(|p| p.name == name)
    }

    pub fn is_random(&self) -> bool {
        matches!(
            self.family,
            Family::Gta {
                sparsify: GtaSparsify::Random | GtaSparsify::Della,
                ..
            }
        )
    }
}

const fn p(name: &'static str, scope: Scope, kind: Kind, default: Fallback) -> Param {
    Param {
        name,
        scope,
        kind,
        default,
    }
}

use Fallback::{Absent, Required, Value};
use Kind::{Bool, Float, Int};
use Scope::{Input, NonBase, Shared};

const WEIGHT: Param = p("weight", NonBase, Float, Required);
const DENSITY: Param = p("density", NonBase, Float, Value(1.0));
const LAMBDA: Param = p("lambda", Shared, Float, Value(1.0));
const INT8_MASK: Param = p("int8_mask", Shared, Bool, Value(0.0));

const fn gta6(normalize: bool, rescale: bool) -> [Param; 6] {
    [
        INT8_MASK,
        p("normalize", Shared, Bool, Value(normalize as u8 as f64)),
        p("rescale", Shared, Bool, Value(rescale as u8 as f64)),
        LAMBDA,
        WEIGHT,
        DENSITY,
    ]
}

const fn gta7(normalize: bool, rescale: bool, extra: Param) -> [Param; 7] {
    let [a, b, c, d, e, f] = gta6(normalize, rescale);
    [a, b, c, d, e, f, extra]
}

// mergekit declares `density` for the whole family; task arithmetic only accepts 1 (see plan).
const TASK_ARITHMETIC: [Param; 6] = gta6(false, false);
const TIES: [Param; 6] = gta6(true, false);
const DARE: [Param; 6] = gta6(false, true);
const GAMMA: Param = p("gamma", NonBase, Float, Value(0.01));
const EPSILON: Param = p("epsilon", NonBase, Float, Value(0.15));
const BREADCRUMBS: [Param; 7] = gta7(false, false, GAMMA);
const DELLA: [Param; 7] = gta7(true, true, EPSILON);
const DELLA_LINEAR: [Param; 7] = gta7(false, true, EPSILON);

const fn gta(
    name: &'static str,
    params: &'static [Param],
    sparsify: GtaSparsify,
    consensus: bool,
) -> Method {
    Method {
        name,
        family: Family::Gta {
            sparsify,
            consensus,
        },
        base: BaseRole::Required,
        params,
        min_models: 0,
        max_models: None,
    }
}

pub static METHODS: &[Method] = &[
    Method {
        name: "linear",
        family: Family::Linear,
        base: BaseRole::Ignored,
        params: &[
            p("weight", Input, Float, Required),
            p("normalize", Shared, Bool, Value(1.0)),
        ],
        min_models: 1,
        max_models: None,
    },
    gta(
        "task_arithmetic",
        &TASK_ARITHMETIC,
        GtaSparsify::None,
        false,
    ),
    gta("ties", &TIES, GtaSparsify::Magnitude, true),
    gta("dare_linear", &DARE, GtaSparsify::Random, false),
    gta("dare_ties", &DARE, GtaSparsify::Random, true),
    gta("breadcrumbs", &BREADCRUMBS, GtaSparsify::Outliers, false),
    gta(
        "breadcrumbs_ties",
        &BREADCRUMBS,
        GtaSparsify::Outliers,
        true,
    ),
    gta("della", &DELLA, GtaSparsify::Della, true),
    gta("della_linear", &DELLA_LINEAR, GtaSparsify::Della, false),
    Method {
        name: "slerp",
        family: Family::Slerp,
        base: BaseRole::Required,
        params: &[p("t", Shared, Float, Required)],
        min_models: 1,
        max_models: Some(1),
    },
    Method {
        name: "nuslerp",
        family: Family::Nuslerp,
        base: BaseRole::Optional,
        params: &[
            WEIGHT,
            p("nuslerp_row_wise", Shared, Bool, Value(0.0)),
            p("nuslerp_flatten", Shared, Bool, Value(1.0)),
        ],
        min_models: 2,
        max_models: Some(2),
    },
    Method {
        name: "multislerp",
        family: Family::Multislerp,
        base: BaseRole::Optional,
        params: &[
            WEIGHT,
            p("normalize_weights", Shared, Bool, Value(1.0)),
            p("eps", Shared, Float, Value(1e-8)),
        ],
        min_models: 1,
        max_models: None,
    },
    Method {
        name: "karcher",
        family: Family::Karcher,
        base: BaseRole::Ignored,
        params: &[
            p("max_iter", Shared, Int, Value(10.0)),
            p("tol", Shared, Float, Value(1e-5)),
        ],
        min_models: 1,
        max_models: None,
    },
    Method {
        name: "model_stock",
        family: Family::ModelStock,
        base: BaseRole::Required,
        params: &[p("filter_wise", Shared, Bool, Value(0.0))],
        min_models: 2,
        max_models: None,
    },
    Method {
        name: "sce",
        family: Family::Sce,
        base: BaseRole::Required,
        params: &[INT8_MASK, p("select_topk", Shared, Float, Value(1.0))],
        min_models: 0,
        max_models: None,
    },
    Method {
        name: "passthrough",
        family: Family::Passthrough,
        base: BaseRole::Ignored,
        params: &[p("scale", Input, Float, Absent)],
        min_models: 1,
        max_models: Some(1),
    },
];

pub fn find(name: &str) -> Option<&'static Method> {
    METHODS.iter().find(|m| m.name == name)
}

pub fn names() -> String {
    METHODS
        .iter()
        .map(|m| m.name)
        .collect::<Vec<_>>()
        .join(", ")
}
