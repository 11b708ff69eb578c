//! The bench's table, JSON and SVG chart.

use std::path::{Path, PathBuf};

use anyhow::Result;
use serde_json::json;

use super::timing::Percentiles;
use super::{BenchArgs, Results};

pub struct Report {
    json: serde_json::Value,
    results: Results,
    title: String,
}

fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    }
}

impl Report {
    pub fn new(
        args: &BenchArgs,
        db: &str,
        broker: &str,
        settings: String,
        results: Results,
    ) -> Report {
        let drain_ratio = ratio(
            results.drain.as_ref().map(|r| r.per_second),
            results.raw_publish.as_ref().map(|r| r.per_second),
        );
        let ceiling = match (&results.raw_publish, &results.db_ceiling) {
            (Some(a), Some(b)) => Some(a.per_second.min(b.per_second)),
            (a, b) => a.as_ref().or(b.as_ref()).map(|r| r.per_second),
        };
        let drain_vs_ceiling = ratio(results.drain.as_ref().map(|r| r.per_second), ceiling);
        let tax_ratio = ratio(
            results.with_outbox.as_ref().map(|r| r.per_second),
            results.business.as_ref().map(|r| r.per_second),
        );
        let json = json!({
            "database": db,
            "broker": broker,
            "settings": settings,
            "machine": { "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0) },
            "command": std::env::args().collect::<Vec<_>>().join(" "),
            "knobs": {
                "batch_size": args.batch_size, "workers": args.workers,
                "poll_interval_ms": args.poll_interval.as_millis() as u64, "wake_in_process": !args.no_wake,
                "writers": args.writers, "payload_bytes": args.payload_bytes, "consumer_concurrency": args.consumer_concurrency,
                "duration_s": args.duration.as_secs_f64(), "messages": args.messages,
            },
            "raw_publish": results.raw_publish,
            "drain": results.drain,
            "drain_vs_raw_publish": drain_ratio,
            "db_ceiling": results.db_ceiling,
            "drain_vs_lower_ceiling": drain_vs_ceiling,
            "steady": results.steady,
            "business_only": results.business,
            "business_plus_outbox": results.with_outbox,
            "producer_tax_ratio": tax_ratio,
            "naive_save_then_publish": results.naive.as_ref().map(|(r, l)| json!({"rate": r, "commit_to_confirm": l})),
            "telemetry": results.telemetry,
        });
        Report {
            json,
            results,
            title: format!("herald bench: {db} + {broker}"),
        }
    }

    pub fn print(&self) {
        let r = &self.results;
        println!("{}", self.title);
        println!("{}", self.json["settings"].as_str().unwrap_or_default());
        println!();
        println!("{:<44} {:>12} {:>10}", "throughput", "msg/s", "count");
        for rate in [
            &r.raw_publish,
            &r.db_ceiling,
            &r.drain,
            &r.business,
            &r.with_outbox,
        ]
        .into_iter()
        .flatten()
        {
            println!(
                "{:<44} {:>12.0} {:>10}",
                rate.name, rate.per_second, rate.count
            );
        }
        if let Some(d) = &r.drain {
            if let Some(c) = &d.relay_db_cost {
                println!(
                    "drain, the relay's own PostgreSQL cost per message: {:.0} WAL bytes, {:.3} transactions, {:.2} rows written",
                    c.wal_bytes_per_event, c.transactions_per_event, c.rows_written_per_event
                );
            }
            if let Some(b) = d.peak_rss_bytes {
                println!(
                    "drain, peak resident memory of the bench process (relay with its batches in flight): {:.1} MiB for a backlog of {}",
                    b as f64 / (1024.0 * 1024.0),
                    d.count
                );
            }
        }
        if let Some((rate, _)) = &r.naive {
            println!(
                "{:<44} {:>12.0} {:>10}",
                rate.name, rate.per_second, rate.count
            );
        }
        if let Some(x) = self.json["drain_vs_raw_publish"].as_f64() {
            println!("drain / raw publish: {:.0}%", x * 100.0);
        }
        if let Some(x) = self.json["drain_vs_lower_ceiling"].as_f64() {
            println!(
                "drain / lower of the two ceilings (broker, database): {:.0}%",
                x * 100.0
            );
        }
        if let Some(x) = self.json["producer_tax_ratio"].as_f64() {
            println!("business+outbox / business-only: {:.0}%", x * 100.0);
        }
        if let Some(t) = &r.telemetry {
            for rate in [&t.off, &t.on] {
                println!(
                    "{:<44} {:>12.0} {:>10}",
                    rate.name, rate.per_second, rate.count
                );
            }
            println!(
                "telemetry on / off: {:.0}% of the throughput, {} of the CPU per message ({}; {} of {} spans reached the local OTLP sink; one /metrics scrape: {} bytes)",
                t.ratio * 100.0,
                t.cpu_ratio
                    .map_or_else(|| "-".to_owned(), |r| format!("{:.0}%", r * 100.0)),
                match (t.off.cpu_us_per_message, t.on.cpu_us_per_message) {
                    (Some(a), Some(b)) => format!("{a:.1} vs {b:.1} us"),
                    _ => "not measured".to_owned(),
                },
                t.spans_received,
                t.on.count,
                t.scrape_bytes
            );
        }
        if !r.steady.is_empty() || r.naive.is_some() {
            println!();
            println!(
                "{:<28} {:>9} {:>33} {:>33}",
                "latency (ms)",
                "achieved/s",
                "commit -> broker confirm p50/p90/p99/max",
                "commit -> consumer commit p50/p90/p99/max"
            );
            for s in &r.steady {
                println!(
                    "{:<28} {:>9.0} {:>41} {:>42}",
                    s.name,
                    s.achieved_per_second,
                    fmt(&s.commit_to_confirm),
                    fmt(&s.commit_to_consumer)
                );
            }
            if let Some((rate, lat)) = &r.naive {
                println!(
                    "{:<28} {:>9.0} {:>41} {:>42}",
                    "naive save-then-publish",
                    rate.per_second,
                    fmt(lat),
                    "-"
                );
            }
            for s in &r.steady {
                println!(
                    "producers' share ({}): intended send -> commit returned {}",
                    s.name,
                    fmt(&s.intended_to_commit)
                );
            }
            for s in &r.steady {
                if let Some(c) = &s.db_cost {
                    println!(
                        "db cost per event ({}): WAL {:.0} B, {:.2} transactions, {:.2} rows written; peak dead tuples {}; outbox {} kB + {} kB indexes",
                        s.name,
                        c.wal_bytes_per_event,
                        c.transactions_per_event,
                        c.rows_written_per_event,
                        c.peak_dead_tuples,
                        c.outbox_table_bytes / 1024,
                        c.outbox_index_bytes / 1024
                    );
                }
            }
        }
    }

    pub fn write(&self, out: &Path) -> Result<PathBuf> {
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let dir = out.join(format!(
            "{stamp}-{}-{}",
            self.json["database"].as_str().unwrap_or(""),
            self.json["broker"].as_str().unwrap_or("")
        ));
        std::fs::create_dir_all(&dir)?;
        std::fs::write(
            dir.join("results.json"),
            serde_json::to_string_pretty(&self.json)?,
        )?;
        std::fs::write(dir.join("latency.svg"), self.svg())?;
        Ok(dir)
    }

    /// Grouped bars: p50/p90/p99 of commit -> confirm for each steady run, log scale.
    fn svg(&self) -> String {
        let rows: Vec<(String, Percentiles)> = self
            .results
            .steady
            .iter()
            .map(|s| (s.name.clone(), s.commit_to_confirm))
            .chain(
                self.results
                    .naive
                    .iter()
                    .map(|(_, l)| ("naive".to_owned(), *l)),
            )
            .collect();
        let (w, row_h, left) = (760.0, 54.0, 190.0);
        let h = 70.0 + row_h * rows.len() as f64;
        let max = rows.iter().map(|(_, p)| p.p99_ms).fold(1.0_f64, f64::max);
        let x = |ms: f64| {
            left + (w - left - 40.0) * ((ms.max(0.01) / 0.01).log10() / (max / 0.01).log10())
        };
        let mut svg = format!(
            "<svg xmlns='http://www.w3.org/2000/svg' width='{w}' height='{h}' font-family='sans-serif' font-size='12'>\
             <rect width='100%' height='100%' fill='white'/>\
             <text x='10' y='20' font-size='14'>{} - commit to broker confirm, ms (log scale)</text>",
            self.title
        );
        for (i, (name, p)) in rows.iter().enumerate() {
            let y = 40.0 + row_h * i as f64;
            svg.push_str(&format!("<text x='10' y='{}'>{name}</text>", y + 26.0));
            for (j, (label, v, color)) in [
                ("p50", p.p50_ms, "#4c78a8"),
                ("p90", p.p90_ms, "#f58518"),
                ("p99", p.p99_ms, "#e45756"),
            ]
            .iter()
            .enumerate()
            {
                let yy = y + 4.0 + 15.0 * j as f64;
                svg.push_str(&format!(
                    "<rect x='{left}' y='{yy}' width='{:.1}' height='12' fill='{color}'/><text x='{:.1}' y='{}'>{label} {v:.2}</text>",
                    (x(*v) - left).max(1.0),
                    x(*v) + 4.0,
                    yy + 10.0
                ));
            }
        }
        svg.push_str("</svg>");
        svg
    }
}

fn fmt(p: &Percentiles) -> String {
    if p.count == 0 {
        return "-".to_owned();
    }
    format!(
        "{:.2} / {:.2} / {:.2} / {:.2}",
        p.p50_ms, p.p90_ms, p.p99_ms, p.max_ms
    )
}
