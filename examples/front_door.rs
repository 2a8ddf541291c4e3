//! The front door alone, without the supervisor, Synapse, PostgreSQL or ACME: TLS termination,
//! HTTP/1.1 and HTTP/2, routing, the proxy to an upstream on 127.0.0.1 and, optionally, Element
//! Web. Used by packaging/bench/front-door and packaging/bench/element to compare it with nginx.
//!
//! ```text
//! cargo build --release --locked --example front_door
//! front_door --upstream-port 8008 --https-port 8443 --http-port 8080 --federation-port 8448 \
//!     --cert fullchain.pem --key privkey.pem --server-name bench.test \
//!     [--state-dir /tmp/fd-state [--element-dir ./webapp [--element-version 1.11.0]]]
//! ```
//!
//! It listens on 127.0.0.1 only and serves until SIGINT or SIGTERM. Requests for
//! `https://matrix.<server-name>:<https-port>/_matrix/...` go to the upstream.
//!
//! With `--state-dir`, it also serves Element on `https://element.<server-name>:<https-port>/`
//! the way `homelab-matrix run` does (`Element::new`, the release under `<state-dir>/element`,
//! an `element.json` in the state dir if there is one), but never checks for or downloads
//! updates. `--element-dir` first installs that unpacked tree as the current release, exactly
//! like an update does (a copy, precompressed with brotli and gzip once), with the version
//! from `--element-version` or else the tree's `version` file. A later start with the same
//! `--state-dir` and no `--element-dir` serves what is installed, without installing again.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use homelab_matrix::certs::{Cert, CertStore, Source};
use homelab_matrix::config::Config;
use homelab_matrix::element::Element;
use homelab_matrix::http::{Bound, FrontDoor, Limits};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;

const USAGE: &str = "usage: front_door --upstream-port N --https-port N --http-port N \
--federation-port N --cert PEM --key PEM --server-name NAME \
[--state-dir DIR [--element-dir DIR [--element-version VERSION]]]";

/// How long open connections get to finish after the stop signal.
const DRAIN: Duration = Duration::from_secs(2);

struct Args {
    upstream_port: u16,
    https_port: u16,
    http_port: u16,
    federation_port: u16,
    cert: String,
    key: String,
    server_name: String,
    /// Where Element releases are installed (`[state] dir`); Element is served only with it.
    state_dir: Option<PathBuf>,
    /// An unpacked Element tree to install before serving.
    element_dir: Option<PathBuf>,
    element_version: Option<String>,
}

fn parse_args() -> Result<Args> {
    let mut upstream_port = None;
    let mut https_port = None;
    let mut http_port = None;
    let mut federation_port = None;
    let mut cert = None;
    let mut key = None;
    let mut server_name = None;
    let mut state_dir = None;
    let mut element_dir = None;
    let mut element_version = None;
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "-h" || flag == "--help" {
            println!("{USAGE}");
            std::process::exit(0);
        }
        let value = it
            .next()
            .with_context(|| format!("{flag} needs a value\n{USAGE}"))?;
        let port = |v: &str| -> Result<u16> {
            v.parse()
                .with_context(|| format!("{flag}: {v:?} is not a port"))
        };
        match flag.as_str() {
            "--upstream-port" => upstream_port = Some(port(&value)?),
            "--https-port" => https_port = Some(port(&value)?),
            "--http-port" => http_port = Some(port(&value)?),
            "--federation-port" => federation_port = Some(port(&value)?),
            "--cert" => cert = Some(value),
            "--key" => key = Some(value),
            "--server-name" => server_name = Some(value),
            "--state-dir" => state_dir = Some(absolute(&flag, &value)?),
            "--element-dir" => element_dir = Some(absolute(&flag, &value)?),
            "--element-version" => element_version = Some(value),
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    let missing = |name: &str| anyhow::anyhow!("{name} is required\n{USAGE}");
    if state_dir.is_none() && (element_dir.is_some() || element_version.is_some()) {
        bail!("--element-dir and --element-version need --state-dir\n{USAGE}");
    }
    if element_version.is_some() && element_dir.is_none() {
        bail!("--element-version needs --element-dir\n{USAGE}");
    }
    Ok(Args {
        upstream_port: upstream_port.ok_or_else(|| missing("--upstream-port"))?,
        https_port: https_port.ok_or_else(|| missing("--https-port"))?,
        http_port: http_port.ok_or_else(|| missing("--http-port"))?,
        federation_port: federation_port.ok_or_else(|| missing("--federation-port"))?,
        cert: cert.ok_or_else(|| missing("--cert"))?,
        key: key.ok_or_else(|| missing("--key"))?,
        server_name: server_name.ok_or_else(|| missing("--server-name"))?,
        state_dir,
        element_dir,
        element_version,
    })
}

/// The config wants absolute paths; relative ones are taken from the working directory.
fn absolute(flag: &str, value: &str) -> Result<PathBuf> {
    std::path::absolute(value).with_context(|| format!("{flag}: {value:?}"))
}

/// `--element-version`, or else the first line of the tree's `version` file (as in Element's
/// release tarballs).
fn element_version(args: &Args, dir: &Path) -> Result<String> {
    if let Some(v) = &args.element_version {
        return Ok(v.clone());
    }
    let file = dir.join("version");
    let text = std::fs::read_to_string(&file).with_context(|| {
        format!(
            "reading {} (or give the version with --element-version)",
            file.display()
        )
    })?;
    Ok(text.lines().next().unwrap_or("").trim().to_string())
}

/// Opens the Element releases under `--state-dir` and installs `--element-dir` if given.
async fn element(args: &Args, cfg: &Config, https_port: u16) -> Result<Option<Arc<Element>>> {
    let Some(state_dir) = &args.state_dir else {
        return Ok(None);
    };
    let element = Element::new(
        cfg,
        state_dir,
        https_port,
        homelab_matrix::alerts::Alerts::new(),
    )?;
    if let Some(dir) = &args.element_dir {
        let version = element_version(args, dir)?;
        let started = std::time::Instant::now();
        element
            .install_from_dir(dir, &version)
            .await
            .with_context(|| format!("installing {} as Element {version}", dir.display()))?;
        eprintln!(
            "front_door: installed {} as Element {version} in {:.1} s",
            dir.display(),
            started.elapsed().as_secs_f64()
        );
    }
    match element.version() {
        Some(v) => eprintln!(
            "front_door: serving Element {v} from {}",
            state_dir.display()
        ),
        None => eprintln!(
            "front_door: no Element release under {}: the element host answers with a placeholder page",
            state_dir.display()
        ),
    }
    Ok(Some(element))
}

fn config(args: &Args) -> Result<Config> {
    let mut doc = toml::Table::new();
    doc.insert("server_name".into(), args.server_name.clone().into());
    let mut listen = toml::Table::new();
    for (key, port) in [
        ("http", args.http_port),
        ("https", args.https_port),
        ("federation", args.federation_port),
    ] {
        listen.insert(key.into(), format!("127.0.0.1:{port}").into());
    }
    doc.insert("listen".into(), listen.into());
    let mut synapse = toml::Table::new();
    synapse.insert("port".into(), i64::from(args.upstream_port).into());
    synapse.insert("max_upload_size".into(), "50M".into());
    doc.insert("synapse".into(), synapse.into());
    if let Some(dir) = &args.state_dir {
        let mut state = toml::Table::new();
        let dir = dir.to_str().context("--state-dir is not UTF-8")?;
        state.insert("dir".into(), dir.into());
        doc.insert("state".into(), state.into());
    }
    let text = toml::to_string(&doc).context("writing the config")?;
    Config::from_toml(&text).map_err(|problems| {
        let lines: Vec<String> = problems.iter().map(|p| format!("  {p}")).collect();
        anyhow::anyhow!("invalid config:\n{}", lines.join("\n"))
    })
}

async fn run(args: Args) -> Result<()> {
    let cfg = config(&args)?;
    let chain =
        std::fs::read_to_string(&args.cert).with_context(|| format!("reading {}", args.cert))?;
    let key =
        std::fs::read_to_string(&args.key).with_context(|| format!("reading {}", args.key))?;
    let cert = Arc::new(
        Cert::parse(&chain, &key, Source::Files)
            .with_context(|| format!("loading {} and {}", args.cert, args.key))?,
    );
    // The store's directory is only used for saving, which this example never does.
    let certs = CertStore::new(&std::env::temp_dir(), &cfg.server_name);
    for name in cfg.served_names() {
        certs.publish(&name, cert.clone());
    }

    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;

    let bound = Bound::bind(&cfg).await?;
    let https_port = bound.https_port();
    let element = element(&args, &cfg, https_port).await?;
    let serves_element = element.is_some();
    // The load generators all come from 127.0.0.1: one address may take every place to the
    // upstream here, or its share (a quarter) answers 503 to h2load's 160 streams.
    let defaults = Limits::default();
    let limits = Limits {
        upstream_max_per_addr: Some(defaults.upstream_max_connections),
        ..defaults
    };
    let routes = homelab_matrix::app::routes(&cfg, &certs, https_port, &limits, element.as_ref());
    let front = FrontDoor::new(routes, https_port);
    let tls = homelab_matrix::tls::acceptor(certs);
    let (stop_tx, stop_rx) = watch::channel(false);
    let serving = tokio::spawn(front.serve(bound, tls, limits, stop_rx, DRAIN));
    eprintln!(
        "front_door: https://{}:{https_port}/ -> http://127.0.0.1:{} (pid {})",
        cfg.hosts.matrix,
        args.upstream_port,
        std::process::id()
    );
    if serves_element {
        eprintln!(
            "front_door: https://{}:{https_port}/ -> Element",
            cfg.hosts.element
        );
    }

    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    let _ = stop_tx.send(true);
    serving.await.context("the front door task failed")?;
    Ok(())
}

fn main() -> ExitCode {
    homelab_matrix::init_tracing(false);
    // Harmless when a provider is already installed.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("front_door: {e:#}");
            return ExitCode::from(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("front_door: starting the tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("front_door: {e:#}");
            ExitCode::FAILURE
        }
    }
}
