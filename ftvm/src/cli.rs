//! The command-line contract's shared pieces: strict parsing of `--arbiter`, and how a failed
//! command ends (one line on stderr, exit status [`crate::exit::ERROR`], no backtrace whatever
//! `RUST_BACKTRACE` says).

use std::path::Path;

/// A malformed `--arbiter` value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ArbiterSpecError {
    /// Neither `file:` nor `etcd:` / `etcd://`.
    #[error("--arbiter {0:?}: unknown form (file:DIR, etcd://HOST:PORT[,HOST:PORT...][#PREFIX] or etcd:http://HOST:PORT[,...][#PREFIX])")]
    UnknownScheme(String),
    /// `file:` with an empty or missing directory.
    #[error("--arbiter {spec:?}: {dir:?} is not an existing directory")]
    NoDirectory {
        /// The value given.
        spec: String,
        /// The directory named.
        dir: String,
    },
    /// An etcd endpoint that is not `HOST:PORT` (or `http(s)://HOST:PORT`).
    #[error("--arbiter {spec:?}: bad etcd endpoint {endpoint:?} (expected HOST:PORT with a port in 1..=65535)")]
    BadEndpoint {
        /// The value given.
        spec: String,
        /// The endpoint.
        endpoint: String,
    },
}

/// Whether `hp` is `HOST:PORT` (the host non-empty, the port in 1..=65535).
fn host_port(hp: &str) -> bool {
    match hp.rsplit_once(':') {
        Some((host, port)) => {
            !host.is_empty() && !host.contains('/') && port.parse::<u16>().is_ok_and(|p| p > 0)
        }
        None => false,
    }
}

/// Checks an `--arbiter` value and returns the form `ftvm_ft::arbiter::open` takes:
/// `file:DIR` (DIR must exist now: a missing directory is a mistake to report at start, not an
/// outage to wait out), `etcd://HOST:PORT[,HOST:PORT...][#PREFIX]` (turned into
/// `etcd:http://…`), or `etcd:http(s)://HOST:PORT[,...][#PREFIX]`.
///
/// # Errors
/// [`ArbiterSpecError`].
pub fn arbiter_spec(spec: &str) -> Result<String, ArbiterSpecError> {
    let endpoints = |list: &str, scheme_required: bool| -> Result<Vec<String>, ArbiterSpecError> {
        let bad = |e: &str| ArbiterSpecError::BadEndpoint {
            spec: spec.to_string(),
            endpoint: e.to_string(),
        };
        let v: Vec<String> = list.split(',').map(str::to_string).collect();
        for e in &v {
            let hp = match (
                e.strip_prefix("http://")
                    .or_else(|| e.strip_prefix("https://")),
                scheme_required,
            ) {
                (Some(hp), true) => hp,
                (None, false) => e.as_str(),
                _ => return Err(bad(e)),
            };
            if !host_port(hp.trim_end_matches('/')) {
                return Err(bad(e));
            }
        }
        Ok(v)
    };
    if let Some(rest) = spec.strip_prefix("etcd://") {
        let (list, prefix) = match rest.split_once('#') {
            Some((l, p)) => (l, Some(p)),
            None => (rest, None),
        };
        let urls: Vec<String> = endpoints(list, false)?
            .iter()
            .map(|h| format!("http://{h}"))
            .collect();
        let mut out = format!("etcd:{}", urls.join(","));
        if let Some(p) = prefix {
            out.push('#');
            out.push_str(p);
        }
        return Ok(out);
    }
    if let Some(rest) = spec.strip_prefix("etcd:") {
        let list = rest.split_once('#').map_or(rest, |(l, _)| l);
        endpoints(list, true)?;
        return Ok(spec.to_string());
    }
    if let Some(dir) = spec.strip_prefix("file:") {
        if dir.is_empty() || !Path::new(dir).is_dir() {
            return Err(ArbiterSpecError::NoDirectory {
                spec: spec.to_string(),
                dir: dir.to_string(),
            });
        }
        return Ok(spec.to_string());
    }
    Err(ArbiterSpecError::UnknownScheme(spec.to_string()))
}

/// Prints a failed command's error as one line on stderr (its causes joined with `: `; any
/// further lines of the message, such as a child process's output the demo attaches, come
/// first as context) and returns [`crate::exit::ERROR`].
pub fn report_error(e: &anyhow::Error) -> i32 {
    let text = format!("{e:#}");
    let mut lines = text.lines();
    let first = lines.next().unwrap_or("failed");
    let rest: Vec<&str> = lines.collect();
    for l in rest.iter().filter(|l| !l.trim().is_empty()) {
        eprintln!("  {l}");
    }
    eprintln!("ftvm: error: {first}");
    crate::exit::ERROR
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arbiter_forms() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = format!("file:{}", dir.path().display());
        assert_eq!(arbiter_spec(&file), Ok(file.clone()));
        assert_eq!(
            arbiter_spec("etcd://10.0.0.1:2379,h2:2379#/ftvm/x"),
            Ok("etcd:http://10.0.0.1:2379,http://h2:2379#/ftvm/x".into())
        );
        assert_eq!(
            arbiter_spec("etcd:http://127.0.0.1:2379#/p"),
            Ok("etcd:http://127.0.0.1:2379#/p".into())
        );
        for bad in [
            "zookeeper://h:1",
            "/some/dir",
            "",
            "file:",
            "file:/no/such/dir/ftvm",
            "etcd://",
            "etcd://host",
            "etcd://host:0",
            "etcd://host:http",
            "etcd://:2379",
            "etcd://h:1,",
            "etcd:",
            "etcd:127.0.0.1:2379",
        ] {
            assert!(arbiter_spec(bad).is_err(), "{bad:?} accepted");
        }
    }
}
