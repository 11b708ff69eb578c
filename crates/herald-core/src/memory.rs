//! An in-memory transport for unit tests of the relay and consumer engines. Not durable: use the
//! embedded transport (`herald-embedded`) for anything that must survive a restart.

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use tokio::sync::Notify;

use crate::error::{Error, Result};
use crate::message::{Kind, Message};
use crate::transport::{Delivery, Received, Subscriber, Subscription, Transport};

/// Keeps every published message in a vector, in publish order.
#[derive(Clone, Default)]
pub struct MemoryTransport {
    inner: Arc<Shared>,
}

#[derive(Default)]
struct Shared {
    log: Mutex<Vec<Message>>,
    notify: Notify,
}

impl MemoryTransport {
    /// An empty transport.
    pub fn new() -> MemoryTransport {
        MemoryTransport::default()
    }

    /// Everything published so far, in order.
    pub fn published(&self) -> Vec<Message> {
        self.inner
            .log
            .lock()
            .expect("memory transport lock")
            .clone()
    }
}

#[async_trait]
impl Transport for MemoryTransport {
    async fn publish(&self, batch: &[Message]) -> Vec<Result<()>> {
        self.inner
            .log
            .lock()
            .expect("memory transport lock")
            .extend(batch.iter().cloned());
        self.inner.notify.notify_waiters();
        batch.iter().map(|_| Ok(())).collect()
    }

    async fn subscribe(&self, subscription: &Subscription) -> Result<Box<dyn Subscriber>> {
        if subscription.kind == Kind::Command {
            return Err(Error::config("the memory transport only delivers events"));
        }
        Ok(Box::new(MemorySubscriber {
            shared: self.inner.clone(),
            topic: subscription.destination.clone(),
            next: 0,
        }))
    }

    fn describe(&self) -> String {
        "memory".to_owned()
    }
}

struct MemorySubscriber {
    shared: Arc<Shared>,
    topic: String,
    next: usize,
}

#[async_trait]
impl Subscriber for MemorySubscriber {
    async fn next(&mut self) -> Result<Received> {
        loop {
            let notified = self.shared.notify.notified();
            {
                let log = self.shared.log.lock().expect("memory transport lock");
                while self.next < log.len() {
                    let i = self.next;
                    self.next += 1;
                    if log[i].destination == self.topic {
                        return Ok(Received::Message(Delivery {
                            message: log[i].clone(),
                            redelivered: false,
                            tag: i as u64,
                        }));
                    }
                }
            }
            notified.await;
        }
    }

    async fn ack(&mut self, _tag: u64) -> Result<()> {
        Ok(())
    }

    async fn nack(&mut self, _tag: u64) -> Result<()> {
        Ok(())
    }
}
