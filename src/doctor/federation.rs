//! Federation. Inbound: our `/_matrix/key/v2/server` fetched through the path a remote server
//! takes (server discovery, then TLS for the delegated name), its keys current and the answer
//! signed by our signing key (server-server API "Retrieving server keys", appendix "Signing
//! JSON"). Outbound: Synapse asked to fetch a remote server's keys (its notary endpoint,
//! `/_matrix/key/v2/query`), after checking that this host can reach the remote at all.

use std::time::Duration;

use ring::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};
use serde_json::Value;
use tokio::net::TcpStream;

use super::delegation::Discovered;
use super::net::get_json;
use super::{Check, Ctx, base64_decode, now_secs};
use crate::synapse::Layout;

/// Matrix spec appendix "Canonical JSON": keys sorted by code point, no insignificant
/// whitespace, UTF-8.
pub fn canonical(v: &Value) -> String {
    match v {
        Value::Object(m) => {
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            let parts: Vec<String> = keys
                .into_iter()
                .map(|k| format!("{}:{}", Value::String(k.clone()), canonical(&m[k])))
                .collect();
            format!("{{{}}}", parts.join(","))
        }
        Value::Array(a) => format!(
            "[{}]",
            a.iter().map(canonical).collect::<Vec<_>>().join(",")
        ),
        other => other.to_string(),
    }
}

/// The key ids whose ed25519 signature by `server` over `doc` verifies with the public keys in
/// `keys` (key id → unpadded base64), as the spec's "Checking for a signature" says: the
/// signed bytes are the canonical JSON without `signatures` and `unsigned`.
pub fn signed_by(doc: &Value, server: &str, keys: &Value) -> Vec<String> {
    let mut bare = doc.clone();
    if let Some(m) = bare.as_object_mut() {
        m.remove("signatures");
        m.remove("unsigned");
    }
    let msg = canonical(&bare);
    let mut ok = vec![];
    for (id, sig) in doc["signatures"][server].as_object().into_iter().flatten() {
        let (Some(sig), Some(pk)) = (
            sig.as_str().and_then(base64_decode),
            keys[id]["key"].as_str().and_then(base64_decode),
        ) else {
            continue;
        };
        if id.starts_with("ed25519:")
            && UnparsedPublicKey::new(&ED25519, &pk)
                .verify(msg.as_bytes(), &sig)
                .is_ok()
        {
            ok.push(id.clone());
        }
    }
    ok
}

/// Synapse's signing key file: `ed25519 <version> <unpadded base64 seed>` per line. Returns
/// (key id, public key in unpadded base64).
fn our_key(text: &str) -> Option<(String, Vec<u8>)> {
    let mut it = text.split_whitespace();
    let (alg, version, seed) = (it.next()?, it.next()?, it.next()?);
    if alg != "ed25519" {
        return None;
    }
    let pair = Ed25519KeyPair::from_seed_unchecked(&base64_decode(seed)?).ok()?;
    Some((
        format!("ed25519:{version}"),
        pair.public_key().as_ref().to_vec(),
    ))
}

pub async fn inbound(ctx: &Ctx<'_>, discovered: &Discovered) -> Check {
    const NAME: &str = "federation-in";
    let sn = &ctx.cfg.server_name;
    let target = match discovered {
        Ok(t) => t,
        Err((_, Some(fallback))) => fallback,
        Err((seen, None)) => return Check::fail(NAME, seen.clone(), "fix delegation-server first"),
    };
    let url = format!("{}/_matrix/key/v2/server", target.base());
    let fix = format!(
        "remote servers cannot verify {sn}: fix the delegation-server and tls checks first; see `homelab-matrix status` for Synapse"
    );
    let client = match target.client(&ctx.net).await {
        Ok(c) => c,
        Err(e) => return Check::fail(NAME, format!("{}; but {e:#}", target.how), fix),
    };
    let doc = match get_json(client.get(&url), NAME, &format!("GET {url}"), &fix, &fix).await {
        Ok(v) => v,
        Err(c) => return c,
    };
    if doc["server_name"] != sn.as_str() {
        return Check::fail(
            NAME,
            format!("{url} answers for {}, not {sn}", doc["server_name"]),
            format!(
                "the delegated host must be this appliance's Synapse, whose server_name is {sn}"
            ),
        );
    }
    let valid_until = doc["valid_until_ts"].as_u64().unwrap_or(0) / 1000;
    if valid_until <= now_secs() {
        return Check::fail(
            NAME,
            format!("the keys at {url} expired (valid_until_ts {valid_until})"),
            "restart Synapse (`systemctl restart homelab-matrix`): it re-signs its keys",
        );
    }
    let signed = signed_by(&doc, sn, &doc["verify_keys"]);
    if signed.is_empty() {
        return Check::fail(
            NAME,
            format!("{url}: the answer is not validly signed by any of its own verify_keys"),
            fix,
        );
    }
    let key_path = Layout::new(&ctx.cfg.state_dir()).signing_key();
    let ours = std::fs::read_to_string(&key_path)
        .ok()
        .and_then(|t| our_key(&t));
    let mine = match &ours {
        Some((id, pk)) => {
            let served = doc["verify_keys"][id]["key"]
                .as_str()
                .and_then(base64_decode);
            if served.as_deref() != Some(pk.as_slice()) || !signed.contains(id) {
                return Check::fail(
                    NAME,
                    format!(
                        "{url} is signed by {}, not by our signing key {id} ({})",
                        signed.join(", "),
                        key_path.display()
                    ),
                    "another server answers for this name: check where the delegated host resolves",
                );
            }
            format!("signed by our key {id}")
        }
        None => format!(
            "signed by {} (our key file {} could not be read to compare)",
            signed.join(", "),
            key_path.display()
        ),
    };
    Check::pass(
        NAME,
        format!(
            "{} via {}; {mine}, valid for {}",
            url,
            target.endpoint(),
            crate::units::human_duration(Duration::from_secs(valid_until - now_secs()))
        ),
    )
}

pub async fn outbound(ctx: &Ctx<'_>) -> Check {
    const NAME: &str = "federation-out";
    let remote = &ctx.opts.remote;
    if let Err(why) = reachable(ctx, remote).await {
        return Check::warn(
            NAME,
            format!("no internet: {why}; outbound federation was not tested"),
            format!(
                "run `homelab-matrix doctor --only federation-out` again when this host can reach {remote}"
            ),
        );
    }
    // Synapse's notary endpoint. Asked for all of a server's keys it answers only from its
    // cache (synapse/rest/key/v2/remote_key_resource.py, query_keys: no fetch when no key id
    // is named); asked for a key id it lacks, it fetches the server's keys over federation and
    // stores them all. So: a key id no server has, to make it fetch; then all keys. (Synapse
    // requires minimum_valid_until_ts in each criterion.)
    let base = ctx.cfg.synapse_local_url();
    let _ = ctx
        .net
        .http()
        .post(format!("{base}/_matrix/key/v2/query"))
        .json(&serde_json::json!({"server_keys": {remote.as_str(): {"ed25519:homelab-matrix-doctor": {"minimum_valid_until_ts": 0}}}}))
        .timeout(Duration::from_secs(60))
        .send()
        .await;
    let url = format!("{base}/_matrix/key/v2/query/{remote}");
    let doc = match get_json(
        ctx.net.http().get(&url).timeout(Duration::from_secs(60)),
        NAME,
        &format!("Synapse's key query for {remote}"),
        "see Synapse's log (`journalctl -u homelab-matrix`)",
        "see `homelab-matrix status`: Synapse must be running",
    )
    .await
    {
        Ok(v) => v,
        Err(c) => return c,
    };
    let keys: Vec<&Value> = doc["server_keys"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|k| k["server_name"] == remote.as_str())
        .collect();
    match keys.first() {
        Some(k) if !signed_by(k, remote, &k["verify_keys"]).is_empty() => Check::pass(
            NAME,
            format!(
                "Synapse fetched {remote}'s keys ({}) over federation",
                k["verify_keys"]
                    .as_object()
                    .map(|m| m.keys().cloned().collect::<Vec<_>>().join(", "))
                    .unwrap_or_default()
            ),
        ),
        _ => Check::fail(
            NAME,
            format!(
                "this host reaches {remote}, but Synapse could not fetch its keys (it answered {})",
                doc.to_string().chars().take(300).collect::<String>()
            ),
            format!(
                "Synapse's log says why (`journalctl -u homelab-matrix | grep -i {remote}`); outbound 443 and 8448 must be open, and DNS must resolve {remote}"
            ),
        ),
    }
}

/// Can this host open a connection to `remote` at all (443 for its well-known, or 8448)?
async fn reachable(ctx: &Ctx<'_>, remote: &str) -> Result<(), String> {
    let ips = ctx
        .net
        .resolve(remote)
        .await
        .map_err(|e| format!("cannot resolve {remote} ({e:#})"))?;
    for port in [443u16, 8448] {
        let connect = TcpStream::connect((ips[0], port));
        if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_secs(5), connect).await {
            return Ok(());
        }
    }
    Err(format!(
        "{remote} ({}) does not answer on 443 or 8448 from this host",
        ips[0]
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The spec's own example (appendix "Canonical JSON").
    #[test]
    fn canonical_json_sorts_keys_and_drops_whitespace() {
        let v = json!({"b": "2", "a": "1", "c": {"z": [1, {"y": null, "x": true}]}, "é": "ü"});
        assert_eq!(
            canonical(&v),
            r#"{"a":"1","b":"2","c":{"z":[1,{"x":true,"y":null}]},"é":"ü"}"#
        );
    }

    #[test]
    fn a_signature_verifies_only_over_the_unmodified_document() {
        let seed = [7u8; 32];
        let pair = Ed25519KeyPair::from_seed_unchecked(&seed).unwrap();
        let b64 = |b: &[u8]| {
            // Test-only encoder, the inverse of base64_decode.
            const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
            let mut s = String::new();
            for c in b.chunks(3) {
                let n = c.iter().fold(0u32, |a, &x| (a << 8) | x as u32) << (8 * (3 - c.len()));
                for i in 0..=c.len() {
                    s.push(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
                }
            }
            s
        };
        let pk = b64(pair.public_key().as_ref());
        let mut doc = json!({"server_name": "a.test", "valid_until_ts": 1,
                             "verify_keys": {"ed25519:k": {"key": pk}}});
        let sig = pair.sign(canonical(&doc).as_bytes());
        doc["signatures"] = json!({"a.test": {"ed25519:k": b64(sig.as_ref())}});
        doc["unsigned"] = json!({"ignored": true});
        assert_eq!(
            signed_by(&doc, "a.test", &doc["verify_keys"]),
            ["ed25519:k"]
        );
        doc["valid_until_ts"] = json!(2);
        assert!(signed_by(&doc, "a.test", &doc["verify_keys"]).is_empty());
        let text = format!("ed25519 k {}", b64(&seed));
        assert_eq!(our_key(&text).unwrap().1, pair.public_key().as_ref());
    }
}
