//! `keys`: the tenants' API keys for the HTTP API, and their webhook signing secrets.

use std::process::ExitCode;
use std::time::Duration;

use clap::Subcommand;
use secrecy::ExposeSecret;

use super::{connect_store, load_settings};
use crate::auth;
use crate::webhooks;

/// What `keys` does.
#[derive(Debug, Subcommand)]
pub(super) enum KeysAction {
    /// Create an API key; the key is printed once, on the last line, and never stored.
    Create {
        /// The tenant the key acts for.
        #[arg(long)]
        virtual_key: String,
        /// A label for humans (who holds the key).
        #[arg(long, default_value = "")]
        name: String,
        /// The key reads every tenant's tasks.
        #[arg(long)]
        admin: bool,
    },
    /// List keys (never their secrets).
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Revoke a key by id: it authenticates nobody from now on.
    Revoke {
        /// The key's id (`keys list`).
        key_id: String,
    },
    /// Create a webhook signing secret for a tenant (Standard Webhooks, `whsec_…`), printed
    /// once; the tenant's earlier secrets keep signing for the overlap.
    WebhookSecret {
        /// The tenant whose deliveries it signs.
        #[arg(long)]
        virtual_key: String,
        /// How long the earlier secrets keep signing beside the new one.
        #[arg(long, default_value_t = 24)]
        overlap_hours: u64,
    },
}

pub(super) async fn keys(action: KeysAction) -> anyhow::Result<ExitCode> {
    let settings = load_settings()?;
    let store = connect_store(&settings).await?;
    match action {
        KeysAction::Create {
            virtual_key,
            name,
            admin,
        } => {
            let created = auth::create_key(&store, &virtual_key, &name, admin).await?;
            let r = &created.record;
            let role = if r.admin { "admin key" } else { "key" };
            println!(
                "created {role} {} for virtual key {}",
                r.id, r.virtual_key_id
            );
            println!("store it now: it is not shown again");
            println!("{}", created.key.expose_secret());
        }
        KeysAction::List { json } => {
            let keys = store.list_api_keys().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&keys)?);
            } else {
                println!(
                    "{:<16}  {:<24}  {:<6}  {:<20}  {:<20}  name",
                    "id", "virtual key", "admin", "created", "revoked"
                );
                for k in keys {
                    let when = |t: Option<chrono::DateTime<chrono::Utc>>| {
                        t.map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
                            .unwrap_or_else(|| "-".to_owned())
                    };
                    println!(
                        "{:<16}  {:<24}  {:<6}  {:<20}  {:<20}  {}",
                        k.id,
                        k.virtual_key_id,
                        k.admin,
                        when(Some(k.created_at)),
                        when(k.revoked_at),
                        k.name
                    );
                }
            }
        }
        KeysAction::Revoke { key_id } => {
            if !store.revoke_api_key(&key_id).await? {
                eprintln!("no key `{key_id}` that is not already revoked");
                return Ok(ExitCode::from(1));
            }
            println!("revoked {key_id}");
        }
        KeysAction::WebhookSecret {
            virtual_key,
            overlap_hours,
        } => {
            let secret = webhooks::new_secret();
            let overlap = Duration::from_secs(overlap_hours.saturating_mul(3600));
            store
                .add_webhook_secret(&virtual_key, &secret, overlap)
                .await?;
            println!(
                "webhook secret for {virtual_key}; earlier ones sign for {overlap_hours} h more"
            );
            println!("{secret}");
        }
    }
    Ok(ExitCode::SUCCESS)
}
