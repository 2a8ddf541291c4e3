//! Registration-token guessing through the front door (issue #24 item 6): against the real
//! appliance and Synapse, wrong guesses at `/register`'s `m.login.registration_token` stage
//! get 429 `M_LIMIT_EXCEEDED` with `Retry-After` within the budget (before, all twenty got
//! 401), the validity endpoint shares that budget, a person at another address still signs
//! up with a real token, and none of it writes a warning.

// This test process drives the binary and curl from outside.
#![allow(clippy::disallowed_methods)]

mod common;

use common::{Lab, require_appliance};
use serde_json::{Value, json};

/// One request through the front door from source address `from`: status, headers, body.
fn call(
    lab: &Lab,
    from: &str,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> (u16, String, Value) {
    let mut c = lab.curl();
    c.args(["--interface", from, "-i", "-X", method, "--cacert"])
        .arg(lab.ca_root())
        .arg(format!("{}{path}", lab.https_base()));
    if let Some(b) = body {
        c.args(["-H", "Content-Type: application/json", "--data-binary"])
            .arg(b.to_string());
    }
    let out = c.output().unwrap();
    if !out.status.success() {
        eprintln!(
            "curl {method} {path} from {from}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let text = String::from_utf8_lossy(&out.stdout).replace("\r\n", "\n");
    // The last header block (curl -i prints each response's).
    let (head, body) = text.rsplit_once("\n\n").unwrap_or((&text, ""));
    let head = head.rsplit("HTTP/").next().unwrap_or("").to_string();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (
        status,
        head.to_ascii_lowercase(),
        serde_json::from_str(body).unwrap_or(Value::Null),
    )
}

#[test]
fn guessing_registration_tokens_meets_429_and_a_person_still_signs_up() {
    if !require_appliance() {
        return;
    }
    let lab = Lab::new("reglimit");
    let run = lab.start();
    let reg = "/_matrix/client/v3/register";
    let body = json!({"username": "mallory", "password": "mallory-password-1"});
    let (st, _, first) = call(&lab, "127.0.0.1", "POST", reg, Some(&body));
    assert_eq!(st, 401, "{first}");
    let session = first["session"].as_str().unwrap().to_string();
    let mut statuses = vec![];
    let mut limited = None;
    for i in 0..20 {
        let mut b = body.clone();
        b["auth"] = json!({"type": "m.login.registration_token", "token": format!("guess-{i:04}"), "session": session});
        let (st, head, v) = call(&lab, "127.0.0.1", "POST", reg, Some(&b));
        statuses.push(st);
        if st == 429 && limited.is_none() {
            limited = Some((head, v));
        }
    }
    eprintln!("guesses: {statuses:?}");
    let (head, v) = limited.unwrap_or_else(|| panic!("no 429 in twenty guesses: {statuses:?}"));
    assert_eq!(v["errcode"], "M_LIMIT_EXCEEDED", "{v}");
    assert!(v["retry_after_ms"].as_u64().is_some_and(|ms| ms > 0), "{v}");
    assert!(head.contains("retry-after: "), "{head}");
    // Within the budget the guesses reached Synapse and were wrong; past it none did.
    let wrong = statuses.iter().filter(|s| **s == 401).count();
    assert!((5..=10).contains(&wrong), "{statuses:?}");
    assert!(
        statuses.iter().all(|s| *s == 401 || *s == 429),
        "{statuses:?}"
    );
    assert_eq!(*statuses.last().unwrap(), 429, "{statuses:?}");
    // The validity endpoint is the same oracle and the same budget.
    let (st, _, v) = call(
        &lab,
        "127.0.0.1",
        "GET",
        "/_matrix/client/v1/register/m.login.registration_token/validity?token=guess-x",
        None,
    );
    assert_eq!(
        (st, v["errcode"].as_str()),
        (429, Some("M_LIMIT_EXCEEDED")),
        "{v}"
    );

    // A friend with a real token, at another address, is not held up.
    let token = "friend-token-1";
    lab.ok(&["token", "create", "--uses", "1", "--token", token]);
    let friend = json!({"username": "friend", "password": "friend-password-1"});
    let (st, _, v) = call(&lab, "127.0.0.2", "POST", reg, Some(&friend));
    assert_eq!(st, 401, "{v}");
    let session = v["session"].as_str().unwrap().to_string();
    let mut b = friend.clone();
    b["auth"] = json!({"type": "m.login.registration_token", "token": token, "session": session});
    let (st, _, v) = call(&lab, "127.0.0.2", "POST", reg, Some(&b));
    assert_eq!(st, 401, "the token stage completes: {v}");
    assert!(
        v["completed"]
            .to_string()
            .contains("m.login.registration_token"),
        "{v}"
    );
    let mut b = friend;
    b["auth"] = json!({"type": "m.login.dummy", "session": session});
    let (st, _, v) = call(&lab, "127.0.0.2", "POST", reg, Some(&b));
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["user_id"], "@friend:matrix.test");

    // The lab has no internet: Element's update check and coturn's STUN lookup warn about
    // that; nothing else may.
    let log = run.log_text();
    let warns: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
        .filter(|l| !l.contains("Element") && !l.contains("child=\"coturn\""))
        .collect();
    assert!(warns.is_empty(), "{warns:#?}");
}
