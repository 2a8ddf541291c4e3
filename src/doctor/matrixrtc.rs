//! `matrixrtc`: group calls in Element X and Element Call (MatrixRTC, MSC4143) need a LiveKit
//! SFU, which this appliance does not include. Without `[matrixrtc]` the line says so; with
//! it, the authorization service must answer through the front door and the SFU be reachable,
//! and what a caller meets on the way to a call is checked from outside (`calls`).

use serde_json::{Value, json};

use super::delegation::{Discovered, error_chain};
use super::{Check, Ctx};
use crate::config::{MATRIXRTC_PATH, first_line, https_url};
use crate::secrets::Secrets;
use crate::synapse::admin::{SERVICE_LOCALPART, Synapse};

/// The checks of `calls`, for `--only`.
pub const NAMES: [&str; 4] = [
    "matrixrtc:well-known",
    "matrixrtc:transports",
    "matrixrtc:userinfo",
    "matrixrtc:token",
];

const NAME: &str = "matrixrtc";

pub async fn check(ctx: &Ctx<'_>) -> Check {
    let rtc = &ctx.cfg.matrixrtc;
    if !rtc.enabled() {
        return Check::warn(
            NAME,
            "no LiveKit server configured: group calls in Element X and Element Call need one (MatrixRTC); none is advertised, 1:1 calls use TURN",
            "to offer group calls, run LiveKit elsewhere (or use a hosted one) and set livekit_url, api_key_file and api_secret_file in [matrixrtc]",
        );
    }
    for file in [&rtc.api_key_file, &rtc.api_secret_file] {
        if first_line(std::path::Path::new(file)).is_none() {
            return Check::fail(
                NAME,
                format!("{file} cannot be read or is empty: no LiveKit token can be minted"),
                "write the LiveKit API key and secret into [matrixrtc] api_key_file and api_secret_file, one each",
            );
        }
    }
    let service = format!(
        "{}{MATRIXRTC_PATH}",
        https_url(&ctx.cfg.hosts.matrix, ctx.net.https_port)
    );
    let health = format!("{service}/healthz");
    match ctx.net.http().get(&health).send().await {
        Ok(r) if r.status().is_success() => {}
        Ok(r) => {
            return Check::fail(
                NAME,
                format!("GET {health} answered {}", r.status()),
                "restart homelab-matrix so that the front door serves the MatrixRTC authorization service",
            );
        }
        Err(e) => {
            return Check::fail(
                NAME,
                format!("GET {health} failed: {}", error_chain(&e)),
                "is homelab-matrix running? `systemctl status homelab-matrix`",
            );
        }
    }
    // LiveKit answers plain HTTP(S) on its WebSocket port ("OK" at /).
    let probe = rtc
        .livekit_url
        .replacen("wss://", "https://", 1)
        .replacen("ws://", "http://", 1);
    match ctx.net.http().get(&probe).send().await {
        Ok(r) => Check::pass(
            NAME,
            format!(
                "authorization service at {service}; LiveKit at {} answers ({})",
                rtc.livekit_url,
                r.status()
            ),
        ),
        Err(e) => Check::warn(
            NAME,
            format!(
                "authorization service at {service} answers, but LiveKit at {} could not be reached from here: {}",
                rtc.livekit_url,
                error_chain(&e)
            ),
            "check that LiveKit runs and that this host (and your users) can reach it; calls fail until it answers",
        ),
    }
}

/// MSC4143's transports on both paths, as Element X asks (the stable one first).
const TRANSPORTS: [&str; 2] = [
    "/_matrix/client/v1/rtc/transports",
    "/_matrix/client/unstable/org.matrix.msc4143/rtc/transports",
];

/// What a call's participants meet, from outside, with the appliance's service account:
/// the well-known's `rtc_foci`; both transports paths agreeing with it (never `200 {}`,
/// which Element X takes for "no calls here"); the federation OpenID userinfo endpoint the
/// way another server reaches it (server discovery, the federation port), which a remote
/// focus checks our users' tokens on; and the authorization service taking a real OpenID
/// token end to end.
pub async fn calls(ctx: &Ctx<'_>, discovered: &Discovered) -> Vec<Check> {
    let cfg = ctx.cfg;
    let base = https_url(&cfg.hosts.matrix, ctx.net.https_port);
    let focus = cfg.matrixrtc.focus(&base);
    let mut out = vec![];
    let admin = match Synapse::new(&cfg.synapse_local_url())
        .service_session(&Secrets::open(&cfg.state_dir()))
        .await
    {
        Ok(a) => a,
        Err(e) => {
            return vec![Check::fail(
                NAMES[1],
                format!("cannot log in as the appliance's service account: {e:#}"),
                "fix the synapse check first",
            )];
        }
    };
    let token = admin.token().expose().to_string();

    // The well-known, where Element X and Element Call look first.
    let wk_url = format!(
        "{}/.well-known/matrix/client",
        https_url(&cfg.server_name, ctx.net.https_port)
    );
    let wk = get(ctx, &wk_url, None).await;
    let foci = wk
        .as_ref()
        .ok()
        .map(|(_, v)| v["org.matrix.msc4143.rtc_foci"].clone());
    if let Some(f) = &focus {
        out.push(match &foci {
            Some(v) if *v == json!([f]) => Check::pass(NAMES[0], format!("{wk_url} lists the focus {f}")),
            Some(v) => Check::fail(
                NAMES[0],
                format!("{wk_url} has rtc_foci {v}, not [{f}]"),
                "restart homelab-matrix; if the server name's well-known is served elsewhere, add the focus there",
            ),
            None => Check::fail(
                NAMES[0],
                format!("GET {wk_url}: {}", wk.as_ref().err().cloned().unwrap_or_default()),
                "fix the delegation-client check first",
            ),
        });
    }

    // Both transports paths, with a real access token.
    let mut answers = vec![];
    for path in TRANSPORTS {
        let url = format!("{base}{path}");
        answers.push((url.clone(), get(ctx, &url, Some(&token)).await));
    }
    out.push(transports(&answers, focus.as_ref()));

    let Some(_) = focus else { return out };
    // A real OpenID token of the service account (client-server API "OpenID").
    let user = format!("@{SERVICE_LOCALPART}:{}", cfg.server_name);
    let url = format!(
        "{base}/_matrix/client/v3/user/{}/openid/request_token",
        crate::uri::percent_encode(&user)
    );
    let openid = match ctx
        .net
        .http()
        .post(&url)
        .bearer_auth(&token)
        .json(&json!({}))
        .send()
        .await
    {
        Ok(r) if r.status().is_success() => r.json::<Value>().await.unwrap_or(Value::Null),
        Ok(r) => {
            out.push(Check::fail(
                NAMES[3],
                format!("POST {url} answered {}", r.status()),
                "see Synapse's log (`journalctl -u homelab-matrix`)",
            ));
            return out;
        }
        Err(e) => {
            out.push(Check::fail(
                NAMES[3],
                format!("POST {url} failed: {}", error_chain(&e)),
                "is homelab-matrix running? `systemctl status homelab-matrix`",
            ));
            return out;
        }
    };
    let access = openid["access_token"].as_str().unwrap_or_default();
    out.push(userinfo(ctx, discovered, access, &user).await);

    // The authorization service with that token, for a room the account is in none of: the
    // token must be verified (not 401) and the membership check refuse (403).
    let service = format!("{base}{MATRIXRTC_PATH}/get_token");
    let body = json!({
        "room_id": format!("!doctor-check:{}", cfg.server_name),
        "slot_id": "m.call#ROOM",
        "openid_token": openid,
        "member": {"id": "doctor", "claimed_user_id": user, "claimed_device_id": "DOCTOR"},
    });
    out.push(match ctx.net.http().post(&service).json(&body).send().await {
        Ok(r) if r.status() == reqwest::StatusCode::FORBIDDEN => Check::pass(
            NAMES[3],
            format!("{service} verified a real OpenID token with Synapse and refused a room the account is not in (403), as it must"),
        ),
        Ok(r) => {
            let st = r.status();
            let v = r.json::<Value>().await.unwrap_or(Value::Null);
            Check::fail(
                NAMES[3],
                format!("{service} answered {st} {v} to a real OpenID token for a room the account is not in (expected 403)"),
                "see the MatrixRTC lines of `journalctl -u homelab-matrix`; a 401 means Synapse did not vouch for its own token",
            )
        }
        Err(e) => Check::fail(NAMES[3], format!("POST {service} failed: {}", error_chain(&e)), "is homelab-matrix running? `systemctl status homelab-matrix`"),
    });
    out
}

/// Both paths' answers agree with the focus: 200 with `rtc_transports: [focus]`, or, with no
/// focus configured, no 200 on either.
fn transports(answers: &[(String, Got)], focus: Option<&Value>) -> Check {
    let name = NAMES[1];
    let mut seen = vec![];
    for (url, got) in answers {
        let ok = match (got, focus) {
            (Err(e), _) => {
                return Check::fail(
                    name,
                    format!("GET {url}: {e}"),
                    "is homelab-matrix running? `systemctl status homelab-matrix`",
                );
            }
            (Ok((200, v)), Some(f)) => v["rtc_transports"] == json!([f]),
            (Ok((200, _)), None) => false,
            (Ok(_), Some(_)) => false,
            (Ok(_), None) => true,
        };
        let (st, v) = got.as_ref().expect("errors returned above");
        if !ok {
            return Check::fail(
                name,
                format!("GET {url} answered {st} {v}"),
                match focus {
                    Some(_) => {
                        "restart homelab-matrix (it writes Synapse's matrix_rtc.transports and msc4143_enabled); an experimental_features of your own in synapse.d must keep msc4143_enabled: true"
                    }
                    None => {
                        "remove matrix_rtc and msc4143_enabled from synapse.d: with no LiveKit configured no transport may be advertised"
                    }
                },
            );
        }
        seen.push(format!("{url}: {st}"));
    }
    Check::pass(name, format!("both paths agree: {}", seen.join(", ")))
}

/// `/_matrix/federation/v1/openid/userinfo` as another server's focus asks it: found by
/// server discovery, on the federation port, through the front door.
async fn userinfo(ctx: &Ctx<'_>, discovered: &Discovered, access: &str, user: &str) -> Check {
    let name = NAMES[2];
    let target = match discovered {
        Ok(t) | Err((_, Some(t))) => t,
        Err((seen, None)) => return Check::fail(name, seen.clone(), "fix delegation-server first"),
    };
    let url = format!("{}/_matrix/federation/v1/openid/userinfo", target.base());
    let fix = "other servers' call services cannot check our users' tokens, so our users cannot watch calls there: fix the delegation-server and federation-in checks first";
    let client = match target.client(&ctx.net).await {
        Ok(c) => c,
        Err(e) => return Check::fail(name, format!("{}; but {e:#}", target.how), fix),
    };
    match client
        .get(format!(
            "{url}?access_token={}",
            crate::uri::percent_encode(access)
        ))
        .send()
        .await
    {
        Ok(r) if r.status().is_success() => {
            let v = r.json::<Value>().await.unwrap_or(Value::Null);
            if v["sub"] == user {
                Check::pass(
                    name,
                    format!("{url} (at {}) vouches for {user}", target.endpoint()),
                )
            } else {
                Check::fail(
                    name,
                    format!("{url} answered {v}, not {{\"sub\": \"{user}\"}}"),
                    fix,
                )
            }
        }
        Ok(r) => Check::fail(
            name,
            format!(
                "GET {url} (at {}) answered {}",
                target.endpoint(),
                r.status()
            ),
            fix,
        ),
        Err(e) => Check::fail(
            name,
            format!(
                "GET {url} (at {}) failed: {}",
                target.endpoint(),
                error_chain(&e)
            ),
            fix,
        ),
    }
}

/// A GET's status and JSON body (Null when none), or why it failed.
type Got = Result<(u16, Value), String>;

/// GET through the front door as a client.
async fn get(ctx: &Ctx<'_>, url: &str, token: Option<&str>) -> Got {
    let mut rb = ctx.net.http().get(url);
    if let Some(t) = token {
        rb = rb.bearer_auth(t);
    }
    let r = rb.send().await.map_err(|e| error_chain(&e))?;
    let st = r.status().as_u16();
    Ok((st, r.json::<Value>().await.unwrap_or(Value::Null)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ans(st: u16, v: Value) -> Vec<(String, Got)> {
        TRANSPORTS
            .iter()
            .map(|p| (p.to_string(), Ok((st, v.clone()))))
            .collect()
    }

    #[test]
    fn transports_must_agree_with_the_focus_and_never_be_an_empty_200() {
        let f = json!({"type": "livekit", "livekit_service_url": "https://m/livekit/jwt"});
        assert_eq!(
            transports(&ans(200, json!({"rtc_transports": [f]})), Some(&f)).status,
            super::super::Status::Pass
        );
        assert_eq!(
            transports(&ans(200, json!({})), Some(&f)).status,
            super::super::Status::Fail
        );
        assert_eq!(
            transports(&ans(404, json!({"errcode": "M_UNRECOGNIZED"})), Some(&f)).status,
            super::super::Status::Fail
        );
        assert_eq!(
            transports(&ans(404, json!({})), None).status,
            super::super::Status::Pass
        );
        assert_eq!(
            transports(&ans(200, json!({})), None).status,
            super::super::Status::Fail
        );
        let mut mixed = ans(200, json!({"rtc_transports": [f]}));
        mixed[0].1 = Ok((404, json!({})));
        assert_eq!(
            transports(&mixed, Some(&f)).status,
            super::super::Status::Fail
        );
    }
}
