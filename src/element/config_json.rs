//! Element Web's `config.json`, made for this server (element-web docs/config.md), with the
//! operator's overrides merged in.

use super::*;

/// The `config.json` Element gets: the homeserver it belongs to, plus choices a private
/// server wants (element-web docs/config.md), deep-merged with the operator's element.json.
pub fn client_config(cfg: &Config, https_port: u16, overrides: Option<Value>) -> Value {
    let base_url = crate::config::https_url(&cfg.hosts.matrix, https_port);
    let mut v = json!({
        "default_server_config": {
            "m.homeserver": {"base_url": base_url, "server_name": cfg.server_name}
        },
        // Registration needs a token and guests are off in Synapse; email and phone login
        // need an identity server this appliance does not run.
        "disable_guests": true,
        "disable_3pid_login": true,
        "disable_custom_urls": false,
        "brand": "Element",
        "default_theme": "light",
        "room_directory": {"servers": [cfg.server_name]},
        "show_labs_settings": false,
        // The integration manager (scalar.vector.im) is a third-party service; a private
        // server does not send it its users' rooms by default.
        "integrations_ui_url": null,
        "integrations_rest_url": null,
        "integrations_widgets_urls": null,
        "permalink_prefix": crate::config::https_url(&cfg.hosts.element, https_port),
        "setting_defaults": {"UIFeature.registration": true, "UIFeature.passwordReset": false},
    });
    // Group calls (Element Call) only with a MatrixRTC focus to hold them: otherwise every
    // call button would lead to a call that cannot start; 1:1 calls over TURN stay either
    // way. Element Web 1.12.24+ reads `element_call.disable` (Element Call is its default
    // there); older ones the `feature_group_calls` labs flag (element-web docs/config.md).
    let calls = cfg.matrixrtc.enabled();
    let o = v.as_object_mut().expect("an object");
    o.insert("element_call".into(), json!({"disable": !calls}));
    o.insert("features".into(), json!({"feature_group_calls": calls}));
    if let Some(o) = overrides {
        merge(&mut v, o);
    }
    v
}

fn merge(base: &mut Value, over: Value) {
    match (base, over) {
        (Value::Object(b), Value::Object(o)) => {
            for (k, v) in o {
                merge(b.entry(k).or_insert(Value::Null), v);
            }
        }
        (b, o) => *b = o,
    }
}

pub(super) fn client_config_bytes(
    cfg: &Config,
    https_port: u16,
    overrides: &Path,
) -> Result<(Bytes, String)> {
    let over = match std::fs::read(overrides) {
        Ok(text) => Some(serde_json::from_slice::<Value>(&text).map_err(|e| {
            anyhow!(
                "{}: not valid JSON ({e})\n    fix: correct it (it is merged into Element's config.json) or remove it",
                overrides.display()
            )
        })?),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(e).with_context(|| format!("reading {}", overrides.display())),
    };
    if over.as_ref().is_some_and(|o| !o.is_object()) {
        return Err(anyhow!(
            "{}: must be a JSON object like {{\"brand\": \"My chat\"}}",
            overrides.display()
        ));
    }
    let body = serde_json::to_vec_pretty(&client_config(cfg, https_port, over))?;
    let etag = format!("\"{}\"", &sha256_hex(&body)[..32]);
    Ok((Bytes::from(body), etag))
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn client_config_points_at_this_server_and_merges_overrides() {
        let cfg = Config::from_toml("server_name = \"example.org\"\n").unwrap();
        let v = client_config(
            &cfg,
            443,
            Some(
                json!({"brand": "Our chat", "setting_defaults": {"x": 1}, "integrations_ui_url": "https://i"}),
            ),
        );
        assert_eq!(
            v["default_server_config"]["m.homeserver"]["base_url"],
            "https://matrix.example.org"
        );
        assert_eq!(
            v["default_server_config"]["m.homeserver"]["server_name"],
            "example.org"
        );
        assert_eq!(v["brand"], "Our chat");
        assert_eq!(v["setting_defaults"]["x"], 1);
        assert_eq!(v["setting_defaults"]["UIFeature.passwordReset"], false);
        assert_eq!(v["integrations_ui_url"], "https://i");
        assert_eq!(v["disable_guests"], true);
    }

    #[test]
    fn no_group_call_button_without_a_focus_to_hold_the_call() {
        let off = Config::from_toml("server_name = \"example.org\"\n").unwrap();
        let v = client_config(&off, 443, None);
        assert_eq!(v["element_call"]["disable"], true);
        assert_eq!(v["features"]["feature_group_calls"], false);
        let on = Config::from_toml(
            "server_name = \"example.org\"\n[matrixrtc]\nlivekit_url = \"wss://lk.example.org\"\napi_key_file = \"/k\"\napi_secret_file = \"/s\"\n",
        )
        .unwrap();
        let v = client_config(&on, 443, None);
        assert_eq!(v["element_call"]["disable"], false);
        assert_eq!(v["features"]["feature_group_calls"], true);
    }
}
