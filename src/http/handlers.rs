//! The front door's own small answers, registered by `app` like any other handler: the Matrix
//! well-known files, ACME HTTP-01 answers and the landing page. Their bodies are made once.

use std::sync::Arc;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Response, StatusCode};
use serde_json::json;

use super::router::{ACME_CHALLENGE, Hosts};
use super::{Body, Handler, full, handler, https_url};
use crate::certs::CertStore;

/// RFC 8555 §8.3: the key authorization for a pending HTTP-01 token.
pub fn acme_http01(certs: Arc<CertStore>) -> Handler {
    handler(move |req, _cx| {
        let answer = req
            .uri()
            .path()
            .strip_prefix(ACME_CHALLENGE)
            .and_then(|token| certs.http01(token));
        async move {
            match answer {
                Some(ka) => full(StatusCode::OK, "application/octet-stream", ka),
                None => full(StatusCode::NOT_FOUND, "text/plain", "no such challenge\n"),
            }
        }
    })
}

/// Matrix spec, server-server API "/.well-known/matrix/server".
pub fn well_known_server(matrix_host: &str, https_port: u16) -> Handler {
    let body = Bytes::from(json!({"m.server": format!("{matrix_host}:{https_port}")}).to_string());
    fixed(body, "application/json", false)
}

/// Matrix spec, client-server API "Well-known URI"; clients fetch it cross-origin, so CORS is
/// required. `rtc_focus`: MSC4143's focus, only when one is there (an advertised but empty
/// focus breaks clients' calls).
pub fn well_known_client(
    matrix_host: &str,
    https_port: u16,
    rtc_focus: Option<&serde_json::Value>,
) -> Handler {
    let base_url = https_url(matrix_host, https_port);
    let mut wk = json!({"m.homeserver": {"base_url": base_url}});
    if let Some(focus) = rtc_focus {
        wk["org.matrix.msc4143.rtc_foci"] = json!([focus]);
    }
    let body = Bytes::from(wk.to_string());
    fixed(body, "application/json", true)
}

/// A small page on the matrix host (and the server name) pointing at Element.
pub fn landing(hosts: &Hosts, https_port: u16) -> Handler {
    let element = https_url(&hosts.element, https_port);
    let body = page(
        &format!("Matrix server {}", hosts.server_name),
        &format!(
            "This is a Matrix homeserver. Chat in the browser at <a href=\"{element}\">{element}</a>, or use any Matrix client with the server name <code>{}</code>.",
            hosts.server_name
        ),
    );
    fixed(Bytes::from(body), "text/html; charset=utf-8", false)
}

fn fixed(body: Bytes, content_type: &'static str, cors: bool) -> Handler {
    handler(move |_req, _cx| {
        let mut r: Response<Body> = full(StatusCode::OK, content_type, body.clone());
        if cors {
            r.headers_mut().insert(
                header::ACCESS_CONTROL_ALLOW_ORIGIN,
                HeaderValue::from_static("*"),
            );
        }
        async move { r }
    })
}

fn page(title: &str, body: &str) -> String {
    format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><meta name=\"viewport\" content=\"width=device-width\"><title>{title}</title></head><body style=\"font-family:sans-serif;max-width:40em;margin:3em auto\"><h1>{title}</h1><p>{body}</p></body></html>\n"
    )
}
