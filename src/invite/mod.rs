//! Invite links (DESIGN.md §9a): `https://<matrix host>/invite#<token>` opens a sign-up page
//! that the front door serves itself. The page (embedded HTML, CSS and JS, no framework, no
//! external resource) checks the token with Synapse, asks a username and a password, and
//! registers through Synapse's token flow on the same origin. Element X cannot sign up with a
//! registration token itself, so this page is how a friend joins.
//!
//! The token stays in the URL fragment, which browsers never send. The page asks Synapse's
//! validity endpoint (the token then is in a query string, which Synapse logs: see
//! `supervisor::output::redact_secrets`), and only when Synapse says "invalid" it asks
//! `POST /invite/check` why: used up, expired or unknown, which the public API does not tell.
//! That check reads the admin API's token list, so it puts the token in no URL.

use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{Method, Response, StatusCode, header};
use serde_json::json;

use crate::config::{Config, https_url};
use crate::secrets::Secrets;
use crate::synapse::admin::{self, RegistrationToken};

const PAGE: &str = include_str!("page.html");
const SCRIPT: &str = include_str!("page.js");
const STYLE: &str = include_str!("page.css");

/// Where the page lives on the matrix host.
pub const PATH: &str = "/invite";

/// Only our own files, and the API on this origin; nothing inline (no `'unsafe-inline'`), no
/// frames, no form posts elsewhere (CSP Level 3).
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; \
                   img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// The longest `/invite/check` body read: a token is at most 64 characters.
pub const MAX_BODY: usize = 1024;

/// The invite link for `token` on this server.
pub fn link(cfg: &Config, token: &str) -> String {
    format!(
        "{}{PATH}#{token}",
        https_url(&cfg.hosts.matrix, cfg.public_https_port())
    )
}

/// What a token Synapse calls invalid is, for the page to say plainly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenState {
    Valid,
    /// Its uses are taken (registrations in progress count, as in Synapse's own check).
    Used,
    Expired,
    Unknown,
}

impl TokenState {
    pub fn of(tokens: &[RegistrationToken], token: &str, now_ms: i64) -> TokenState {
        let Some(t) = tokens.iter().find(|t| t.token == token) else {
            return TokenState::Unknown;
        };
        match (t.uses_allowed, t.expiry_time) {
            (Some(n), _) if t.completed + t.pending >= n => TokenState::Used,
            (_, Some(ms)) if ms <= now_ms => TokenState::Expired,
            _ => TokenState::Valid,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            TokenState::Valid => "valid",
            TokenState::Used => "used",
            TokenState::Expired => "expired",
            TokenState::Unknown => "unknown",
        }
    }
}

/// The page and its check, as the front door serves them.
pub struct Invite {
    page: String,
    synapse: admin::Synapse,
    secrets: Secrets,
    /// One check at a time: each costs admin API calls, and the endpoint is public.
    one_at_a_time: tokio::sync::Mutex<()>,
}

impl Invite {
    pub fn new(cfg: &Config, https_port: u16) -> Invite {
        let element = https_url(&cfg.hosts.element, https_port);
        let page = PAGE
            .replace("{{SERVER_NAME}}", &html_escape(&cfg.server_name))
            .replace("{{ELEMENT_URL}}", &html_escape(&format!("{element}/")));
        Invite {
            page,
            synapse: admin::Synapse::new(&cfg.synapse_local_url()),
            secrets: Secrets::open(&cfg.state_dir()),
            one_at_a_time: tokio::sync::Mutex::new(()),
        }
    }

    /// Answers a request whose path is [`PATH`] or below it; `body` was read whole by the
    /// caller, at most [`MAX_BODY`] bytes.
    pub async fn serve(&self, method: &Method, path: &str, body: &[u8]) -> Response<Bytes> {
        let rest = path.strip_prefix(PATH).unwrap_or(path);
        match (method, rest) {
            (&Method::GET | &Method::HEAD, "" | "/") => {
                file(&self.page, "text/html; charset=utf-8", "no-store")
            }
            (&Method::GET | &Method::HEAD, "/invite.js") => {
                file(SCRIPT, "text/javascript; charset=utf-8", "no-cache")
            }
            (&Method::GET | &Method::HEAD, "/invite.css") => {
                file(STYLE, "text/css; charset=utf-8", "no-cache")
            }
            (&Method::POST, "/check") => self.check(body).await,
            (_, "" | "/" | "/invite.js" | "/invite.css" | "/check") => plain(
                StatusCode::METHOD_NOT_ALLOWED,
                "method not allowed\n".into(),
            ),
            _ => plain(StatusCode::NOT_FOUND, "not found\n".into()),
        }
    }

    /// `POST /invite/check {"token": T}` -> `{"state": "used"|"expired"|"unknown"}`.
    async fn check(&self, body: &[u8]) -> Response<Bytes> {
        let token = serde_json::from_slice::<serde_json::Value>(body)
            .ok()
            .and_then(|v| v["token"].as_str().map(str::to_string));
        let Some(token) = token.filter(|t| admin::valid_token(t)) else {
            return json_answer(TokenState::Unknown);
        };
        let _one = self.one_at_a_time.lock().await;
        let tokens = match self.synapse.service_session(&self.secrets).await {
            Ok(s) => s.list_tokens().await.map_err(anyhow::Error::from),
            Err(e) => Err(e),
        };
        match tokens {
            // A live token reads "unknown" here: Synapse rate-limits its validity endpoint
            // against guessing (`rc_registration_token_validity`), and this one must not be
            // a way around that. Dead tokens register no one, so naming them gives nothing away.
            Ok(list) => json_answer(match TokenState::of(&list, &token, now_ms()) {
                TokenState::Valid => TokenState::Unknown,
                dead => dead,
            }),
            Err(e) => {
                tracing::warn!(
                    "invite page: cannot read the registration tokens: {e:#}; check that Synapse runs (homelab-matrix status)"
                );
                let mut r = plain(
                    StatusCode::SERVICE_UNAVAILABLE,
                    json!({"errcode": "M_UNKNOWN", "error": "try again in a moment"})
                        .to_string()
                        .into(),
                );
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    header::HeaderValue::from_static("application/json"),
                );
                r
            }
        }
    }
}

fn json_answer(state: TokenState) -> Response<Bytes> {
    let mut r = file(
        &json!({"state": state.as_str()}).to_string(),
        "application/json",
        "no-store",
    );
    *r.status_mut() = StatusCode::OK;
    r
}

fn file(body: &str, content_type: &str, cache: &'static str) -> Response<Bytes> {
    let mut r = plain(StatusCode::OK, Bytes::copy_from_slice(body.as_bytes()));
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_str(content_type).expect("static content type"),
    );
    h.insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static(cache),
    );
    r
}

/// Every answer carries the page's security headers.
fn plain(status: StatusCode, body: Bytes) -> Response<Bytes> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .header(header::CONTENT_SECURITY_POLICY, CSP)
        .header(header::X_CONTENT_TYPE_OPTIONS, "nosniff")
        // The fragment is never sent, but a link on the page must not carry the page's URL.
        .header(header::REFERRER_POLICY, "no-referrer")
        .header(header::X_FRAME_OPTIONS, "DENY")
        .body(body)
        .expect("valid response")
}

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tok(
        token: &str,
        uses: Option<u64>,
        completed: u64,
        expiry: Option<i64>,
    ) -> RegistrationToken {
        RegistrationToken {
            token: token.into(),
            uses_allowed: uses,
            pending: 0,
            completed,
            expiry_time: expiry,
        }
    }

    #[test]
    fn token_states() {
        let list = [
            tok("a", Some(1), 1, None),
            tok("b", Some(2), 0, Some(1_000)),
            tok("c", None, 5, Some(10_000)),
        ];
        assert_eq!(TokenState::of(&list, "a", 0), TokenState::Used);
        assert_eq!(TokenState::of(&list, "b", 2_000), TokenState::Expired);
        assert_eq!(TokenState::of(&list, "b", 500), TokenState::Valid);
        assert_eq!(TokenState::of(&list, "c", 500), TokenState::Valid);
        assert_eq!(TokenState::of(&list, "zz", 0), TokenState::Unknown);
    }

    #[test]
    fn links_put_the_token_in_the_fragment() {
        let cfg = Config::from_toml(
            "server_name = \"example.com\"\n[hosts]\nmatrix = \"m.example.com\"\n",
        )
        .unwrap();
        assert_eq!(link(&cfg, "AbC_1"), "https://m.example.com/invite#AbC_1");
    }

    #[test]
    fn the_page_has_no_inline_script_or_style_and_names_the_server() {
        let cfg = Config::from_toml("server_name = \"example.com\"\n").unwrap();
        let inv = Invite::new(&cfg, 8443);
        assert!(!inv.page.contains("{{"));
        assert!(!inv.page.contains("style="));
        assert!(!inv.page.contains("<script>"));
        assert!(inv.page.contains(":example.com. Use"));
        assert!(
            inv.page
                .contains("data-element-url=\"https://element.example.com:8443/\"")
        );
        assert_eq!(html_escape("a<b>&\"'"), "a&lt;b&gt;&amp;&quot;&#39;");
    }
}
