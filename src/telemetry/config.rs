//! Telemetry settings: [`TelemetryConfig`] and its resolution from the
//! daemon's flags and the standard `OTEL_*` environment variables (the table
//! is in the module docs of `telemetry`). Pure parsing: starts nothing and
//! calls nothing outside this file.

use std::time::Duration;

use crate::grpc::status::percent_decode;

pub const DEFAULT_EXPORT_INTERVAL: Duration = Duration::from_secs(10);
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
pub const DEFAULT_SERVICE_NAME: &str = "sluice";
pub const DEFAULT_SPAN_QUEUE: usize = 2048;

/// Which traces are recorded (`OTEL_TRACES_SAMPLER`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum SamplerSetting {
    AlwaysOn,
    AlwaysOff,
    TraceIdRatio(f64),
    /// Follow the parent's sampled flag; roots use the inner setting.
    ParentBased(RootSampler),
}

/// The root sampler of [`SamplerSetting::ParentBased`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RootSampler {
    AlwaysOn,
    AlwaysOff,
    TraceIdRatio(f64),
}

/// Resolved telemetry settings (see the module docs for the sources).
#[derive(Debug, Clone, PartialEq)]
pub struct TelemetryConfig {
    /// Collector base URL (`http://host:4318`); `None` disables telemetry.
    pub endpoint: Option<String>,
    pub export_interval: Duration,
    /// Deadline of one export request.
    pub timeout: Duration,
    /// Extra request headers (e.g. authentication for a gateway).
    pub headers: Vec<(String, String)>,
    pub service_name: String,
    /// Further resource attributes (`service.name` excluded).
    pub resource_attributes: Vec<(String, String)>,
    pub sampler: SamplerSetting,
    /// Spans waiting for export before new ones are dropped.
    pub span_queue: usize,
    /// Longest a finished span waits before its batch is sent.
    pub span_delay: Duration,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        TelemetryConfig {
            endpoint: None,
            export_interval: DEFAULT_EXPORT_INTERVAL,
            timeout: DEFAULT_TIMEOUT,
            headers: Vec::new(),
            service_name: DEFAULT_SERVICE_NAME.into(),
            resource_attributes: Vec::new(),
            sampler: SamplerSetting::ParentBased(RootSampler::AlwaysOn),
            span_queue: DEFAULT_SPAN_QUEUE,
            span_delay: DEFAULT_EXPORT_INTERVAL.min(Duration::from_secs(5)),
        }
    }
}

fn millis(env: &impl Fn(&str) -> Option<String>, var: &str) -> Result<Option<u64>, String> {
    match env(var).as_deref().map(str::trim) {
        None | Some("") => Ok(None),
        Some(v) => v
            .parse::<u64>()
            .map(Some)
            .map_err(|_| format!("invalid value {v:?} for {var}: expected milliseconds")),
    }
}

fn ratio(env: &impl Fn(&str) -> Option<String>) -> Result<f64, String> {
    match env("OTEL_TRACES_SAMPLER_ARG").as_deref().map(str::trim) {
        None | Some("") => Ok(1.0),
        Some(v) => match v.parse::<f64>() {
            Ok(p) if (0.0..=1.0).contains(&p) => Ok(p),
            _ => Err(format!(
                "invalid value {v:?} for OTEL_TRACES_SAMPLER_ARG: expected a ratio from 0 to 1"
            )),
        },
    }
}

/// Checks a collector base URL: `http://host[:port][/prefix]`.
fn check_endpoint(v: &str, source: &str) -> Result<String, String> {
    let uri: ::http::Uri = v
        .parse()
        .map_err(|e| format!("invalid value {v:?} for {source}: {e}"))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some("https") => {
            return Err(format!(
                "invalid value {v:?} for {source}: https is not supported; \
                 send to a local collector or agent over http://"
            ))
        }
        _ => {
            return Err(format!(
                "invalid value {v:?} for {source}: expected a URL like http://localhost:4318"
            ))
        }
    }
    if uri.host().is_none_or(str::is_empty) || uri.query().is_some() {
        return Err(format!(
            "invalid value {v:?} for {source}: expected a URL like http://localhost:4318"
        ));
    }
    Ok(v.trim_end_matches('/').to_string())
}

/// Splits `k=v,k2=v2` (values percent-decoded), skipping malformed members.
fn key_values(v: &str) -> Vec<(String, String)> {
    v.split(',')
        .filter_map(|kv| {
            let (k, v) = kv.split_once('=')?;
            let k = k.trim();
            (!k.is_empty()).then(|| (k.to_string(), percent_decode(v.trim())))
        })
        .collect()
}

impl TelemetryConfig {
    /// Resolves the settings from the daemon's flags and the environment
    /// (`env` is `|k| std::env::var(k).ok()` in the daemon). An empty
    /// `flag_endpoint` turns telemetry off even if the environment names one.
    /// Errors name the flag or variable at fault; without an endpoint the
    /// other variables are not looked at.
    pub fn resolve(
        flag_endpoint: Option<String>,
        flag_interval: Option<Duration>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<TelemetryConfig, String> {
        let mut cfg = TelemetryConfig::default();
        if env("OTEL_SDK_DISABLED").is_some_and(|v| v.trim().eq_ignore_ascii_case("true")) {
            return Ok(cfg);
        }
        let endpoint = match flag_endpoint {
            Some(v) if v.trim().is_empty() => None,
            Some(v) => Some(check_endpoint(v.trim(), "--otel-endpoint")?),
            None => match env("OTEL_EXPORTER_OTLP_ENDPOINT") {
                Some(v) if !v.trim().is_empty() => {
                    Some(check_endpoint(v.trim(), "OTEL_EXPORTER_OTLP_ENDPOINT")?)
                }
                _ => None,
            },
        };
        if endpoint.is_none() {
            return Ok(cfg);
        }
        cfg.endpoint = endpoint;

        cfg.export_interval =
            match flag_interval {
                Some(d) if d.is_zero() => {
                    return Err("invalid value for --otel-interval: must be more than 0".into())
                }
                Some(d) => d,
                None => match millis(&env, "OTEL_METRIC_EXPORT_INTERVAL")? {
                    Some(0) => return Err(
                        "invalid value \"0\" for OTEL_METRIC_EXPORT_INTERVAL: must be more than 0"
                            .into(),
                    ),
                    Some(ms) => Duration::from_millis(ms),
                    None => DEFAULT_EXPORT_INTERVAL,
                },
            };
        cfg.timeout = match millis(&env, "OTEL_EXPORTER_OTLP_TIMEOUT")? {
            Some(0) => {
                return Err(
                    "invalid value \"0\" for OTEL_EXPORTER_OTLP_TIMEOUT: must be more than 0"
                        .into(),
                )
            }
            Some(ms) => Duration::from_millis(ms),
            None => DEFAULT_TIMEOUT,
        };
        cfg.headers = env("OTEL_EXPORTER_OTLP_HEADERS")
            .map(|v| key_values(&v))
            .unwrap_or_default();

        let mut resource = env("OTEL_RESOURCE_ATTRIBUTES")
            .map(|v| key_values(&v))
            .unwrap_or_default();
        let from_resource = resource
            .iter()
            .rposition(|(k, _)| k == "service.name")
            .map(|i| resource[i].1.clone());
        resource.retain(|(k, _)| k != "service.name");
        cfg.resource_attributes = resource;
        cfg.service_name = env("OTEL_SERVICE_NAME")
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
            .or(from_resource.filter(|v| !v.is_empty()))
            .unwrap_or_else(|| DEFAULT_SERVICE_NAME.into());

        cfg.sampler = match env("OTEL_TRACES_SAMPLER").as_deref().map(str::trim) {
            None | Some("") | Some("parentbased_always_on") => {
                SamplerSetting::ParentBased(RootSampler::AlwaysOn)
            }
            Some("parentbased_always_off") => SamplerSetting::ParentBased(RootSampler::AlwaysOff),
            Some("parentbased_traceidratio") => {
                SamplerSetting::ParentBased(RootSampler::TraceIdRatio(ratio(&env)?))
            }
            Some("always_on") => SamplerSetting::AlwaysOn,
            Some("always_off") => SamplerSetting::AlwaysOff,
            Some("traceidratio") => SamplerSetting::TraceIdRatio(ratio(&env)?),
            Some(other) => {
                return Err(format!(
                    "invalid value {other:?} for OTEL_TRACES_SAMPLER: expected always_on, \
                     always_off, traceidratio or parentbased_always_on, parentbased_always_off, \
                     parentbased_traceidratio"
                ))
            }
        };
        cfg.span_queue = match millis(&env, "OTEL_BSP_MAX_QUEUE_SIZE")
            .map_err(|e| e.replace("milliseconds", "a number of spans"))?
        {
            Some(0) => {
                return Err(
                    "invalid value \"0\" for OTEL_BSP_MAX_QUEUE_SIZE: must be more than 0".into(),
                )
            }
            Some(n) => n.min(1 << 20) as usize,
            None => DEFAULT_SPAN_QUEUE,
        };
        cfg.span_delay = match millis(&env, "OTEL_BSP_SCHEDULE_DELAY")? {
            Some(ms) => Duration::from_millis(ms.max(1)),
            None => cfg.export_interval.min(Duration::from_secs(5)),
        };
        Ok(cfg)
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use std::collections::HashMap;

    pub(in crate::telemetry) fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn no_endpoint_means_disabled() {
        let cfg = TelemetryConfig::resolve(None, None, env_of(&[])).unwrap();
        assert_eq!(cfg, TelemetryConfig::default());
        assert_eq!(cfg.endpoint, None);
        // Other variables are not even looked at.
        let cfg = TelemetryConfig::resolve(
            None,
            None,
            env_of(&[("OTEL_METRIC_EXPORT_INTERVAL", "soon")]),
        )
        .unwrap();
        assert_eq!(cfg.endpoint, None);
        // An empty flag beats the environment.
        let cfg = TelemetryConfig::resolve(
            Some(String::new()),
            None,
            env_of(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318")]),
        )
        .unwrap();
        assert_eq!(cfg.endpoint, None);
        let cfg = TelemetryConfig::resolve(
            Some("http://c:4318".into()),
            None,
            env_of(&[("OTEL_SDK_DISABLED", "true")]),
        )
        .unwrap();
        assert_eq!(cfg.endpoint, None);
    }

    #[test]
    fn flag_beats_environment_beats_default() {
        let env = env_of(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://env:4318/"),
            ("OTEL_METRIC_EXPORT_INTERVAL", "1500"),
        ]);
        let cfg = TelemetryConfig::resolve(None, None, &env).unwrap();
        assert_eq!(cfg.endpoint.as_deref(), Some("http://env:4318"));
        assert_eq!(cfg.export_interval, Duration::from_millis(1500));
        assert_eq!(cfg.span_delay, Duration::from_millis(1500));
        let cfg = TelemetryConfig::resolve(
            Some("http://flag:4318/prefix".into()),
            Some(Duration::from_secs(1)),
            &env,
        )
        .unwrap();
        assert_eq!(cfg.endpoint.as_deref(), Some("http://flag:4318/prefix"));
        assert_eq!(cfg.export_interval, Duration::from_secs(1));
        let cfg = TelemetryConfig::resolve(Some("http://x:1".into()), None, env_of(&[])).unwrap();
        assert_eq!(cfg.export_interval, DEFAULT_EXPORT_INTERVAL);
        assert_eq!(cfg.timeout, DEFAULT_TIMEOUT);
        assert_eq!(cfg.service_name, "sluice");
        assert_eq!(
            cfg.sampler,
            SamplerSetting::ParentBased(RootSampler::AlwaysOn)
        );
        assert_eq!(cfg.span_delay, Duration::from_secs(5));
    }

    #[test]
    fn standard_variables_are_honoured() {
        let cfg = TelemetryConfig::resolve(
            Some("http://c:4318".into()),
            None,
            env_of(&[
                ("OTEL_EXPORTER_OTLP_TIMEOUT", "2000"),
                (
                    "OTEL_EXPORTER_OTLP_HEADERS",
                    "api-key=s3cr%20t, x-team = core ,junk",
                ),
                (
                    "OTEL_RESOURCE_ATTRIBUTES",
                    "deployment.environment=prod,service.name=from-attrs",
                ),
                ("OTEL_TRACES_SAMPLER", "parentbased_traceidratio"),
                ("OTEL_TRACES_SAMPLER_ARG", "0.25"),
                ("OTEL_BSP_MAX_QUEUE_SIZE", "100"),
                ("OTEL_BSP_SCHEDULE_DELAY", "250"),
            ]),
        )
        .unwrap();
        assert_eq!(cfg.timeout, Duration::from_secs(2));
        assert_eq!(
            cfg.headers,
            vec![
                ("api-key".to_string(), "s3cr t".to_string()),
                ("x-team".to_string(), "core".to_string())
            ]
        );
        assert_eq!(cfg.service_name, "from-attrs");
        assert_eq!(
            cfg.resource_attributes,
            vec![("deployment.environment".to_string(), "prod".to_string())]
        );
        assert_eq!(
            cfg.sampler,
            SamplerSetting::ParentBased(RootSampler::TraceIdRatio(0.25))
        );
        assert_eq!(cfg.span_queue, 100);
        assert_eq!(cfg.span_delay, Duration::from_millis(250));
        let cfg = TelemetryConfig::resolve(
            Some("http://c:4318".into()),
            None,
            env_of(&[
                ("OTEL_SERVICE_NAME", "orders-broker"),
                ("OTEL_RESOURCE_ATTRIBUTES", "service.name=ignored"),
            ]),
        )
        .unwrap();
        assert_eq!(cfg.service_name, "orders-broker");
    }

    #[test]
    fn bad_values_name_their_source() {
        let err = |flag: Option<&str>, interval: Option<Duration>, env: &[(&str, &str)]| {
            TelemetryConfig::resolve(flag.map(String::from), interval, env_of(env)).unwrap_err()
        };
        assert!(err(Some("localhost:4318"), None, &[]).contains("--otel-endpoint"));
        assert!(err(Some("https://c:4318"), None, &[]).contains("https"));
        assert!(err(Some("http://"), None, &[]).contains("--otel-endpoint"));
        assert!(
            err(None, None, &[("OTEL_EXPORTER_OTLP_ENDPOINT", "ftp://x")])
                .contains("OTEL_EXPORTER_OTLP_ENDPOINT")
        );
        let ok = Some("http://c:4318");
        assert!(err(ok, Some(Duration::ZERO), &[]).contains("--otel-interval"));
        assert!(err(ok, None, &[("OTEL_METRIC_EXPORT_INTERVAL", "10s")])
            .contains("OTEL_METRIC_EXPORT_INTERVAL"));
        assert!(err(ok, None, &[("OTEL_EXPORTER_OTLP_TIMEOUT", "0")])
            .contains("OTEL_EXPORTER_OTLP_TIMEOUT"));
        assert!(
            err(ok, None, &[("OTEL_TRACES_SAMPLER", "sometimes")]).contains("OTEL_TRACES_SAMPLER")
        );
        assert!(err(
            ok,
            None,
            &[
                ("OTEL_TRACES_SAMPLER", "traceidratio"),
                ("OTEL_TRACES_SAMPLER_ARG", "2")
            ]
        )
        .contains("OTEL_TRACES_SAMPLER_ARG"));
        assert!(err(ok, None, &[("OTEL_BSP_MAX_QUEUE_SIZE", "many")])
            .contains("OTEL_BSP_MAX_QUEUE_SIZE"));
    }
}
