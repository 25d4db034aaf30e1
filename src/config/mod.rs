//! Process settings (`pgmtls.yaml`): raw YAML -> validated [`Config`], through the same path at
//! start-up, on reload and in `pgmtls check-config`.

pub mod process;
pub mod yaml;

pub use process::{Config, EtcdSettings, Keepalive, LogFormat, Timeouts};
pub use yaml::{ConfigError, ConfigErrors, Fields};
