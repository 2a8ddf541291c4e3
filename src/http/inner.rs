//! The way to Synapse for clients inside this process (the registration bot) when Synapse runs
//! with workers: plain HTTP/1.1 on a loopback port the kernel picks, into the front door's own
//! [`Upstream`], so each request reaches the process that serves it. Synapse's main process
//! alone cannot serve them all: with the to-device stream on a writer it answers an encrypted
//! send 500, and it serves no media (docs/workers.md, "Stream writers").
//!
//! Only the Synapse API, without TLS or the front door's client limits: what Synapse's own
//! 127.0.0.1 listener offers any local process already.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

use anyhow::{Context, Result};
use http_body_util::BodyExt;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::sync::watch;

use super::BoxError;
use super::proxy::Upstream;

const LOOPBACK: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

/// Binds the loopback port and serves until `stop` turns true; returns the base URL.
pub async fn serve(upstream: Arc<Upstream>, mut stop: watch::Receiver<bool>) -> Result<String> {
    let listener = tokio::net::TcpListener::bind(SocketAddr::new(LOOPBACK, 0))
        .await
        .context("binding a loopback port for the bot's way to Synapse's workers")?;
    let url = format!("http://{}", listener.local_addr()?);
    tokio::spawn(async move {
        loop {
            let conn = tokio::select! {
                c = listener.accept() => c,
                _ = stop.wait_for(|s| *s) => return,
            };
            let Ok((stream, _)) = conn else { continue };
            let upstream = upstream.clone();
            let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let upstream = upstream.clone();
                async move {
                    let req = req.map(|b| b.map_err(BoxError::from).boxed());
                    Ok::<_, std::convert::Infallible>(upstream.forward(req, LOOPBACK).await)
                }
            });
            tokio::spawn(http1::Builder::new().serve_connection(TokioIo::new(stream), svc));
        }
    });
    Ok(url)
}
