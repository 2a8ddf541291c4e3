//! A small block-style YAML writer for the configs we render. Strings are written as JSON
//! strings, which YAML 1.2 reads as double-quoted scalars (YAML 1.2 §7.3.1), so no value can
//! turn into another type or break the structure.

use serde_json::Value;

pub fn to_yaml(v: &Value) -> String {
    let mut out = String::new();
    write_value(&mut out, v, 0, false);
    out
}

fn scalar(v: &Value) -> String {
    match v {
        Value::Null => "null".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => Value::String(s.clone()).to_string(),
        Value::Array(a) if a.is_empty() => "[]".into(),
        Value::Object(o) if o.is_empty() => "{}".into(),
        _ => unreachable!("containers are written as blocks"),
    }
}

fn is_block(v: &Value) -> bool {
    matches!(v, Value::Array(a) if !a.is_empty()) || matches!(v, Value::Object(o) if !o.is_empty())
}

fn write_value(out: &mut String, v: &Value, indent: usize, in_list: bool) {
    let pad = " ".repeat(indent);
    match v {
        Value::Object(o) if !o.is_empty() => {
            for (i, (k, val)) in o.iter().enumerate() {
                // The first key of a list item goes on the "- " line.
                if !(in_list && i == 0) {
                    out.push_str(&pad);
                }
                out.push_str(&Value::String(k.clone()).to_string());
                out.push(':');
                if is_block(val) {
                    out.push('\n');
                    write_value(out, val, indent + 2, false);
                } else {
                    out.push(' ');
                    out.push_str(&scalar(val));
                    out.push('\n');
                }
            }
        }
        Value::Array(a) if !a.is_empty() => {
            for item in a {
                out.push_str(&pad);
                out.push_str("- ");
                if matches!(item, Value::Array(_)) && is_block(item) {
                    out.push('\n');
                    write_value(out, item, indent + 2, false);
                } else if is_block(item) {
                    write_value(out, item, indent + 2, true);
                } else {
                    out.push_str(&scalar(item));
                    out.push('\n');
                }
            }
        }
        other => {
            out.push_str(&pad);
            out.push_str(&scalar(other));
            out.push('\n');
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn nested_maps_and_lists() {
        let v = json!({
            "server_name": "example.com",
            "listeners": [{"port": 8008, "resources": [{"names": ["client", "federation"], "compress": false}]}],
            "presence": {"enabled": false},
            "trusted_key_servers": [],
            "weird": "a: b\n#c"
        });
        let y = to_yaml(&v);
        let expect = "\"server_name\": \"example.com\"\n\"listeners\":\n  - \"port\": 8008\n    \"resources\":\n      - \"names\":\n          - \"client\"\n          - \"federation\"\n        \"compress\": false\n\"presence\":\n  \"enabled\": false\n\"trusted_key_servers\": []\n\"weird\": \"a: b\\n#c\"\n";
        assert_eq!(y, expect);
    }
}
