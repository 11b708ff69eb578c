//! `herald replay`: rewind a consumer group on a log broker (embedded, NATS JetStream).

use std::process::ExitCode;

use clap::Args;
use herald::{ReplayFrom, Subscription};

use crate::backends;

/// Flags of `herald replay`.
#[derive(Args)]
pub struct ReplayArgs {
    /// Broker URL: sqlite://path (embedded) or nats://host:4222.
    #[arg(long, env = "HERALD_BROKER_URL", hide_env_values = true)]
    broker: String,
    /// The consuming service (its consumer group).
    #[arg(long)]
    service: String,
    /// The topic whose events to deliver again.
    #[arg(long)]
    topic: String,
    /// Start at this sequence number of the log (1 = the beginning).
    #[arg(long, conflicts_with = "from_time")]
    from_seq: Option<u64>,
    /// Start at the first message stored at or after this time (RFC 3339, UTC, e.g. 2026-11-26T10:00:00Z).
    #[arg(long)]
    from_time: Option<String>,
}

pub async fn run(args: ReplayArgs) -> anyhow::Result<ExitCode> {
    let from = match (&args.from_seq, &args.from_time) {
        (Some(n), _) => ReplayFrom::Seq(*n),
        (None, Some(t)) => {
            ReplayFrom::Time(herald::message::parse_rfc3339(t).ok_or_else(|| {
                herald::Error::config(format!(
                    "{t:?} is not an RFC 3339 UTC time such as 2026-11-26T10:00:00Z"
                ))
            })?)
        }
        (None, None) => ReplayFrom::Seq(1),
    };
    let url = backends::parse_url("broker", &args.broker)?;
    let transport = backends::open_transport(&url).await?;
    let sub = Subscription::events(&args.topic, &args.service);
    transport.replay(&sub, from).await?;
    println!(
        "group {} on {} rewound to {from:?}; its consumers receive those events again and their inbox skips what was applied",
        args.service, args.topic
    );
    Ok(ExitCode::SUCCESS)
}
