//! What the code under test logged, captured by a tracing layer installed once per test
//! process (for tests that run the library in-process).

use std::sync::{Mutex, OnceLock};

use tracing::field::{Field, Visit};
use tracing_subscriber::Layer as _;
use tracing_subscriber::layer::{Context, SubscriberExt};

#[derive(Debug, Clone)]
pub struct Event {
    pub level: tracing::Level,
    pub child: Option<String>,
    pub message: String,
}

static EVENTS: Mutex<Vec<Event>> = Mutex::new(Vec::new());

struct Layer;

#[derive(Default)]
struct Fields {
    child: Option<String>,
    message: String,
}

impl Visit for Fields {
    fn record_str(&mut self, f: &Field, v: &str) {
        match f.name() {
            "child" => self.child = Some(v.to_string()),
            "message" => self.message = v.to_string(),
            _ => {}
        }
    }
    fn record_debug(&mut self, f: &Field, v: &dyn std::fmt::Debug) {
        match f.name() {
            "child" => self.child = Some(format!("{v:?}")),
            "message" => self.message = format!("{v:?}"),
            _ => {}
        }
    }
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Layer {
    fn on_event(&self, e: &tracing::Event<'_>, _: Context<'_, S>) {
        let mut f = Fields::default();
        e.record(&mut f);
        EVENTS.lock().unwrap().push(Event {
            level: *e.metadata().level(),
            child: f.child,
            message: f.message,
        });
    }
}

pub fn install() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        // All of ours and the children's lines; of the libraries (h2, rustls, hyper-util)
        // only what would reach the journal at the service's default level.
        let filter = tracing_subscriber::filter::Targets::new()
            .with_target("homelab_matrix", tracing::Level::TRACE)
            .with_target("child", tracing::Level::TRACE)
            .with_default(tracing::Level::WARN);
        tracing::subscriber::set_global_default(
            tracing_subscriber::registry().with(Layer.with_filter(filter)),
        )
        .expect("installing the capturing subscriber");
    });
}

/// Every event so far.
pub fn all() -> Vec<Event> {
    EVENTS.lock().unwrap().clone()
}

/// The events about child `name` so far.
pub fn of_child(name: &str) -> Vec<Event> {
    EVENTS
        .lock()
        .unwrap()
        .iter()
        .filter(|e| e.child.as_deref() == Some(name))
        .cloned()
        .collect()
}
