//! Bench knobs: a command-line flag, else an environment variable, else a
//! default (relay and soak).

/// `flag`, else environment variable `env`, else `default`.
pub fn pick<T: std::str::FromStr>(flag: Option<T>, env: &str, default: T) -> anyhow::Result<T> {
    match flag {
        Some(v) => Ok(v),
        None => env_var(env).transpose().map(|v| v.unwrap_or(default)),
    }
}

/// Parses environment variable `name`, if set.
pub fn env_var<T: std::str::FromStr>(name: &str) -> Option<anyhow::Result<T>> {
    let value = std::env::var(name).ok()?;
    Some(
        value
            .parse()
            .map_err(|_| anyhow::anyhow!("{name}={value} is not a valid value")),
    )
}
