//! Values the config file writes as text and the program uses typed (durations, sizes, times
//! of day, the TLS mode, networks, addresses): parsed once, when the file is loaded, instead
//! of at each use.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::units::{parse_duration, parse_size};

/// A value of type `T` as the config file writes it. It deserializes from any string, typed
/// or not, so that `Config::from_toml` can report every bad value at once (serde stops at the
/// first error) under its own key; a config holding a bad value never leaves `from_toml`. The
/// text is kept for `config show` and for Synapse's YAML.
#[derive(Clone)]
pub struct Setting<T> {
    text: String,
    value: Result<T, String>,
}

/// How a config value is read from its text; the error says what is wrong with it.
pub trait Parse: Sized {
    fn parse(text: &str) -> Result<Self, String>;
}

impl<T: Parse> Setting<T> {
    /// The value `text` stands for, or its problem (reported by `Config::from_toml`).
    pub fn new(text: &str) -> Setting<T> {
        Setting {
            text: text.to_owned(),
            value: T::parse(text),
        }
    }
}

impl<T> Setting<T> {
    pub fn text(&self) -> &str {
        &self.text
    }

    /// The value, or None when the text is not one (then [`Setting::problem`] says why).
    pub fn value(&self) -> Option<&T> {
        self.value.as_ref().ok()
    }

    pub fn problem(&self) -> Option<&str> {
        self.value.as_ref().err().map(String::as_str)
    }

    /// The value. Every `Config` the program uses comes from `Config::from_toml` or
    /// `Default`, and the first refuses any config with a problem: this does not fail.
    pub fn get(&self) -> &T {
        match &self.value {
            Ok(v) => v,
            Err(e) => panic!(
                "config value {:?} is invalid ({e}); Config::from_toml reports it and returns no config",
                self.text
            ),
        }
    }
}

impl<T: Copy> Setting<T> {
    /// The value, copied.
    pub fn v(&self) -> T {
        *self.get()
    }
}

impl<T> PartialEq for Setting<T> {
    fn eq(&self, other: &Self) -> bool {
        self.text == other.text
    }
}

impl<T> fmt::Debug for Setting<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.text, f)
    }
}

impl<T> Serialize for Setting<T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.text)
    }
}

impl<'de, T: Parse> Deserialize<'de> for Setting<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // A non-string (`timeout = 30`) is a type error with the key and line, as for any key.
        let text = String::deserialize(d)?;
        Ok(Setting::new(&text))
    }
}

impl Parse for Duration {
    fn parse(text: &str) -> Result<Self, String> {
        parse_duration(text)
    }
}

impl Parse for SocketAddr {
    fn parse(text: &str) -> Result<Self, String> {
        text.parse()
            .map_err(|_| format!("{text:?} is not an address with a port"))
    }
}

/// A size in bytes, written like Synapse's `max_upload_size` ("50M").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Size(pub u64);

impl Parse for Size {
    fn parse(text: &str) -> Result<Self, String> {
        parse_size(text).map(Size)
    }
}

/// A time of day, `HH:MM` (24 hours), as minutes after midnight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimeOfDay(pub u32);

impl Parse for TimeOfDay {
    fn parse(text: &str) -> Result<Self, String> {
        let bad = || format!("{text:?} is not a time of day");
        let (h, m) = text.split_once(':').ok_or_else(bad)?;
        let (h, m): (u32, u32) = (h.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
        if h < 24 && m < 60 && text.len() == 5 {
            Ok(TimeOfDay(h * 60 + m))
        } else {
            Err(bad())
        }
    }
}

/// Where the certificates come from (`tls.mode`, DESIGN.md §4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsMode {
    /// Public certificates from an ACME CA (Let's Encrypt by default).
    Acme,
    /// A local CA this program makes, for a LAN.
    Internal,
    /// The operator's own certificate files.
    Files,
}

impl TlsMode {
    pub fn as_str(self) -> &'static str {
        match self {
            TlsMode::Acme => "acme",
            TlsMode::Internal => "internal",
            TlsMode::Files => "files",
        }
    }
}

impl fmt::Display for TlsMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Parse for TlsMode {
    fn parse(text: &str) -> Result<Self, String> {
        match text {
            "acme" => Ok(TlsMode::Acme),
            "internal" => Ok(TlsMode::Internal),
            "files" => Ok(TlsMode::Files),
            other => Err(format!("{other:?} is not a TLS mode")),
        }
    }
}

/// A network in CIDR form ("192.168.1.0/24", "fd00::/8").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Network {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl Parse for Network {
    fn parse(text: &str) -> Result<Self, String> {
        let bad = || format!("{text:?} is not a network");
        let (a, p) = text.split_once('/').ok_or_else(bad)?;
        let addr: IpAddr = a.parse().map_err(|_| bad())?;
        let prefix: u8 = p.parse().map_err(|_| bad())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if prefix > max {
            return Err(bad());
        }
        Ok(Network { addr, prefix })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_typed_once_and_bad_text_is_a_problem_not_a_value() {
        let d: Setting<Duration> = Setting::new("3m");
        assert_eq!(d.v(), Duration::from_secs(180));
        assert_eq!(d.text(), "3m");
        let bad: Setting<Duration> = Setting::new("30");
        assert!(bad.value().is_none());
        assert!(
            bad.problem().unwrap().contains("no unit"),
            "{:?}",
            bad.problem()
        );
        assert_eq!(Setting::<TimeOfDay>::new("03:30").v(), TimeOfDay(210));
        for t in ["3:30", "24:00", "03:60", "0330"] {
            assert!(Setting::<TimeOfDay>::new(t).problem().is_some(), "{t}");
        }
        assert_eq!(Setting::<Size>::new("50M").v(), Size(50 << 20));
        assert_eq!(Setting::<TlsMode>::new("files").v(), TlsMode::Files);
        assert_eq!(
            Setting::<TlsMode>::new("letsencrypt").problem(),
            Some("\"letsencrypt\" is not a TLS mode")
        );
        let n = Setting::<Network>::new("fd00::/8").v();
        assert_eq!((n.addr, n.prefix), ("fd00::".parse().unwrap(), 8));
        for t in ["10.0.0.0/33", "10.0.0.0", "x/8"] {
            assert!(Setting::<Network>::new(t).problem().is_some(), "{t}");
        }
    }
}
