//! librdkafka's in-process mock cluster, for tests and the demo: real Kafka protocol on loopback
//! ports, no JVM, nothing kept on disk.

use std::sync::mpsc;
use std::thread::JoinHandle;

use herald_core::{Error, Result};
use rdkafka::mocking::MockCluster;

/// A running mock Kafka cluster. It listens on loopback ports until dropped.
///
/// librdkafka's mock cluster is not thread-safe to move around, so it lives on a thread of its
/// own; this handle only knows its address.
pub struct MockKafka {
    bootstrap: String,
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl MockKafka {
    /// Starts a cluster of `brokers` brokers.
    pub fn start(brokers: i32) -> Result<MockKafka> {
        let (ready_tx, ready_rx) = mpsc::channel::<std::result::Result<String, String>>();
        let (stop_tx, stop_rx) = mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("herald-mock-kafka".to_owned())
            .spawn(move || match MockCluster::new(brokers) {
                Ok(cluster) => {
                    let _ = ready_tx.send(Ok(cluster.bootstrap_servers()));
                    // Blocks until the handle is dropped (the sender goes away).
                    let _ = stop_rx.recv();
                    drop(cluster);
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e.to_string()));
                }
            })
            .map_err(|e| Error::unavailable("mock Kafka", e))?;
        let bootstrap = ready_rx
            .recv()
            .map_err(|e| Error::unavailable("mock Kafka", e))?
            .map_err(|e| Error::unavailable("mock Kafka", e))?;
        Ok(MockKafka {
            bootstrap,
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }

    /// `host:port,...` of the brokers.
    pub fn bootstrap_servers(&self) -> &str {
        &self.bootstrap
    }

    /// The broker URL herald takes: `kafka://host:port,...`.
    pub fn url(&self) -> String {
        format!("kafka://{}", self.bootstrap)
    }
}

impl Drop for MockKafka {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
