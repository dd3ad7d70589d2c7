//! A parameter's setting as mergekit reads it: a value, a gradient over the layers
//! (`[0, 0.5, 1]`), or a list of `{filter, value}` conditions on tensor names, the first whose
//! filter is a substring of the name winning (none matching: the next scope is asked).

use serde_yaml::Value;

/// A single value.
#[derive(Clone, Debug, PartialEq)]
pub enum Scalar {
    Num(f64),
    Bool(bool),
}

impl Scalar {
    pub fn as_f64(&self) -> f64 {
        match self {
            Scalar::Num(x) => *x,
            Scalar::Bool(b) => f64::from(u8::from(*b)),
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum Setting {
    Value(Scalar),
    /// Values at evenly spaced points of the layers, linearly interpolated between them.
    Gradient(Vec<Scalar>),
    /// `(filter, value)`: `None` or `*` matches every tensor.
    Conditions(Vec<(Option<String>, Setting)>),
}

impl Setting {
    /// Reads a setting; `at` names it in errors (`models[1].parameters.weight`).
    pub fn parse(v: &Value, at: &str) -> Result<Setting, String> {
        match v {
            Value::Number(_) | Value::Bool(_) | Value::String(_) => {
                scalar(v, at).map(Setting::Value)
            }
            Value::Sequence(items) if items.is_empty() => Err(format!(
                "`{at}` is an empty list: a gradient needs at least one value"
            )),
            Value::Sequence(items) if items.iter().all(|i| !matches!(i, Value::Mapping(_))) => {
                items
                    .iter()
                    .enumerate()
                    .map(|(i, x)| scalar(x, &format!("{at}[{i}]")))
                    .collect::<Result<Vec<_>, _>>()
                    .map(Setting::Gradient)
            }
            Value::Sequence(items) => items
                .iter()
                .enumerate()
                .map(|(i, c)| condition(c, &format!("{at}[{i}]")))
                .collect::<Result<Vec<_>, _>>()
                .map(Setting::Conditions),
            Value::Mapping(_) => Ok(Setting::Conditions(vec![condition(v, at)?])),
            _ => Err(format!(
                "`{at}` must be a number, a list or `{{filter, value}}`"
            )),
        }
    }

    /// The value for tensor `name` at layer position `t` ∈ [0, 1], or `None` when no condition
    /// matches `name`.
    pub fn evaluate(&self, name: &str, t: f64) -> Option<Scalar> {
        match self {
            Setting::Value(x) => Some(x.clone()),
            Setting::Gradient(v) => {
                if v.iter().any(|x| matches!(x, Scalar::Bool(_))) {
                    return Some(v[((t * (v.len() - 1) as f64) as usize).min(v.len() - 1)].clone());
                }
                let scaled = t * (v.len() - 1) as f64;
                let i0 = (scaled as usize).min(v.len() - 1);
                let i1 = (i0 + 1).min(v.len() - 1);
                let frac = scaled - i0 as f64;
                Some(Scalar::Num(
                    (1.0 - frac) * v[i0].as_f64() + frac * v[i1].as_f64(),
                ))
            }
            Setting::Conditions(cs) => cs
                .iter()
                .find(|(f, _)| match f.as_deref() {
                    None | Some("*") => true,
                    Some(f) => name.contains(f),
                })
                .and_then(|(_, v)| v.evaluate(name, t)),
        }
    }

    /// Every value this setting can take (for checks that do not depend on the tensor).
    pub fn values(&self) -> Vec<&Scalar> {
        match self {
            Setting::Value(x) => vec![x],
            Setting::Gradient(v) => v.iter().collect(),
            Setting::Conditions(cs) => cs.iter().flat_map(|(_, v)| v.values()).collect(),
        }
    }
}

fn scalar(v: &Value, at: &str) -> Result<Scalar, String> {
    let x = match v {
        Value::Number(n) => Scalar::Num(
            n.as_f64()
                .ok_or_else(|| format!("`{at}` is not a number"))?,
        ),
        Value::Bool(b) => Scalar::Bool(*b),
        Value::String(s) => Scalar::Num(
            s.trim()
                .parse::<f64>()
                .map_err(|_| format!("`{at}` must be a number, got `{s}`"))?,
        ),
        _ => return Err(format!("`{at}` must be a number")),
    };
    if let Scalar::Num(n) = x {
        if !n.is_finite() {
            return Err(format!("`{at}` must be finite"));
        }
    }
    Ok(x)
}

fn condition(v: &Value, at: &str) -> Result<(Option<String>, Setting), String> {
    let Value::Mapping(m) = v else {
        return Err(format!("`{at}` must be `{{filter, value}}`"));
    };
    for k in m.keys() {
        match k.as_str() {
            Some("filter") | Some("value") => {}
            _ => return Err(format!("`{at}`: unknown key {k:?} (filter, value)")),
        }
    }
    let filter = match m.get("filter") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => return Err(format!("`{at}.filter` must be a string")),
    };
    let value = m
        .get("value")
        .ok_or_else(|| format!("`{at}` has no `value`"))?;
    let value = Setting::parse(value, &format!("{at}.value"))?;
    if matches!(value, Setting::Conditions(_)) {
        return Err(format!("`{at}.value` must be a value or a gradient"));
    }
    Ok((filter, value))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(y: &str) -> Setting {
        Setting::parse(&serde_yaml::from_str(y).unwrap(), "p").unwrap()
    }

    #[test]
    fn gradients_interpolate_and_filters_pick_the_first_match() {
        let g = parse("[0, 0.5, 1]");
        assert_eq!(g.evaluate("x", 0.25), Some(Scalar::Num(0.25)));
        assert_eq!(g.evaluate("x", 1.0), Some(Scalar::Num(1.0)));
        let c = parse("[{filter: mlp, value: [1, 0]}, {filter: self_attn, value: 2}]");
        assert_eq!(c.evaluate("layers.0.mlp.up", 0.5), Some(Scalar::Num(0.5)));
        assert_eq!(
            c.evaluate("layers.0.self_attn.q", 0.5),
            Some(Scalar::Num(2.0))
        );
        assert_eq!(c.evaluate("model.norm.weight", 0.5), None);
        assert_eq!(
            parse("{value: 3}").evaluate("any", 0.0),
            Some(Scalar::Num(3.0))
        );
        assert_eq!(
            parse("[true, false]").evaluate("x", 0.9),
            Some(Scalar::Bool(true))
        );
        assert_eq!(
            parse("[true, false]").evaluate("x", 1.0),
            Some(Scalar::Bool(false))
        );
    }

    #[test]
    fn bad_settings_are_named() {
        let e = |y: &str| Setting::parse(&serde_yaml::from_str(y).unwrap(), "p.t").unwrap_err();
        assert!(e("[]").contains("`p.t` is an empty list"));
        assert!(e("[{filter: mlp}]").contains("`p.t[0]` has no `value`"));
        assert!(e("[{filter: mlp, value: [{value: 1}]}]").contains("value or a gradient"));
        assert!(e("abc").contains("must be a number"));
    }
}
