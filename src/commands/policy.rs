//! `lazyblk policy set|unset|list`: the label policy of the store's template center;
//! templates whose label is below a minimum are STALE.

use clap::{Args, Subcommand};

use super::output::print_json;
use crate::flags::{parse_label_key, TokenArg, DEFAULT_STORE};
use crate::printable::printable;
use crate::store::center_wire::Policy;
use crate::store::client::StoreClient;

#[derive(Subcommand, Debug)]
pub enum PolicyCommand {
    /// Require a minimum version of a label: templates below it are STALE.
    Set(PolicySetArgs),
    /// Remove a label's minimum.
    Unset(PolicyUnsetArgs),
    /// Show the minimums.
    List(PolicyListArgs),
}

#[derive(Args, Debug, Clone)]
pub struct PolicySetArgs {
    /// The label key, e.g. guest_agent.
    #[arg(value_parser = parse_label_key)]
    pub key: String,
    /// The minimum, e.g. '>=1.4.2' (dotted numbers).
    pub minimum: String,
    /// URL of the store server.
    #[arg(long, default_value = DEFAULT_STORE)]
    pub store: String,
    #[command(flatten)]
    pub token: TokenArg,
    /// Print the policy after the change as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug, Clone)]
pub struct PolicyUnsetArgs {
    /// The label key (any key the policy holds, even one from before the label grammar).
    pub key: String,
    /// URL of the store server.
    #[arg(long, default_value = DEFAULT_STORE)]
    pub store: String,
    #[command(flatten)]
    pub token: TokenArg,
    /// Print the policy after the change as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug, Clone)]
pub struct PolicyListArgs {
    /// URL of the store server.
    #[arg(long, default_value = DEFAULT_STORE)]
    pub store: String,
    /// Print the policy as JSON (label key to minimum).
    #[arg(long)]
    pub json: bool,
}

/// `lazyblk policy set|unset|list`.
pub async fn run(cmd: PolicyCommand) -> anyhow::Result<()> {
    let (policy, json) = match cmd {
        PolicyCommand::Set(a) => {
            let client = StoreClient::new(&a.store, a.token.resolve()?, None);
            let minimum = Some(a.minimum);
            (
                client.set_policy(&path_segment(&a.key), minimum).await?,
                a.json,
            )
        }
        PolicyCommand::Unset(a) => {
            let client = StoreClient::new(&a.store, a.token.resolve()?, None);
            (
                client.set_policy(&path_segment(&a.key), None).await?,
                a.json,
            )
        }
        PolicyCommand::List(a) => {
            let policy = StoreClient::new(&a.store, None, None).policy().await?;
            if a.json {
                return print_json(&policy);
            }
            print!("{}", listing(&policy));
            return Ok(());
        }
    };
    if json {
        return print_json(&policy);
    }
    println!("policy: {}", printable(&serde_json::to_string(&policy)?));
    Ok(())
}

/// One line per rule.
fn listing(policy: &Policy) -> String {
    if policy.is_empty() {
        return "no policy: no template is STALE\n".into();
    }
    policy
        .iter()
        .map(|(k, v)| format!("{} {}\n", printable(k), printable(v)))
        .collect()
}

/// `s` as one path segment: every byte but the URL's unreserved characters
/// percent-encoded (a label key holds `/`; one from before the grammar may hold more).
fn path_segment(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_one_path_segment() {
        assert_eq!(path_segment("guest_agent"), "guest_agent");
        assert_eq!(path_segment("app.k8s.io/name"), "app.k8s.io%2Fname");
        assert_eq!(path_segment("a b\n"), "a%20b%0A");
    }
}
