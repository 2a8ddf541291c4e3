//! `matrixrtc`: group calls in Element X and Element Call (MatrixRTC, MSC4143) need a LiveKit
//! SFU, which this appliance does not include. Without `[matrixrtc]` the line says so; with
//! it, the authorization service must answer through the front door and the SFU be reachable.

use super::delegation::error_chain;
use super::{Check, Ctx};
use crate::config::{MATRIXRTC_PATH, first_line, https_url};

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
