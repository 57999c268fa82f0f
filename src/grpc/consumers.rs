//! The consumer RPCs of `kongtie.v1.Payment`: creating, fetching from,
//! acknowledging, handing back and re-driving work queues, acknowledging
//! cursors, and seeing and deleting consumers. Each validates its request,
//! calls [`WorkQueues`] and maps back.

use std::{collections::HashSet, time::Duration};

use tonic::Status;

use crate::{
    consumers::{
        Consumer, ConsumerError, DeliverPolicy, Kind, MAX_FETCH, MAX_SEQUENCES, MAX_WAIT,
        QueueSettings, WorkQueues,
    },
    domain::{
        Validator, duration_from_proto, duration_to_proto, parse_consumer,
        parse_consumer_reference, utc_to_timestamp,
    },
    error::Error,
    proto,
    store::StoreError,
};

/// A request's one `name` field, naming a consumer that may exist (Get,
/// Delete): reserved names are refused when a consumer is made, not here.
pub(super) fn consumer_name(name: &str) -> Result<String, Status> {
    let mut v = Validator::default();
    let name = v.field("name", parse_consumer_reference(name));
    Ok(v.finish(|| name)?)
}

/// A list of sequences: 1 to [`MAX_SEQUENCES`] (or none, when `may_be_empty`),
/// each 1 or more; repeats count once.
fn sequences(s: &[u64], may_be_empty: bool) -> Result<Vec<u64>, String> {
    if s.is_empty() && !may_be_empty {
        return Err("must name at least one sequence".to_owned());
    }
    if s.len() > MAX_SEQUENCES {
        return Err(format!(
            "must name at most {MAX_SEQUENCES} sequences, got {}",
            s.len()
        ));
    }
    if s.contains(&0) {
        return Err("sequences start at 1".to_owned());
    }
    let mut seen = HashSet::with_capacity(s.len());
    Ok(s.iter().copied().filter(|x| seen.insert(*x)).collect())
}

fn settings(req: &proto::CreateConsumerRequest) -> (Validator, Option<QueueSettings>) {
    let mut v = Validator::default();
    let policy = v.field(
        "deliver_policy",
        match proto::DeliverPolicy::try_from(req.deliver_policy) {
            Ok(proto::DeliverPolicy::Unspecified | proto::DeliverPolicy::All) => {
                Ok(DeliverPolicy::All)
            }
            Ok(proto::DeliverPolicy::New) => Ok(DeliverPolicy::New),
            Ok(proto::DeliverPolicy::AfterSequence) => {
                Ok(DeliverPolicy::AfterSequence(req.after_sequence))
            }
            Err(_) => Err(format!("{} is not a DeliverPolicy", req.deliver_policy)),
        },
    );
    let after = v.field(
        "after_sequence",
        match policy {
            Some(DeliverPolicy::AfterSequence(_)) | None => Ok(()),
            Some(_) if req.after_sequence == 0 => Ok(()),
            Some(_) => Err("is only for DELIVER_POLICY_AFTER_SEQUENCE".to_owned()),
        },
    );
    let ack_wait = v.field(
        "ack_wait",
        match &req.ack_wait {
            None => Ok(QueueSettings::DEFAULT_ACK_WAIT),
            Some(d) => duration_from_proto(d, QueueSettings::MAX_ACK_WAIT).and_then(|d| {
                if d < QueueSettings::MIN_ACK_WAIT {
                    Err(format!(
                        "must be at least {}s, got {}s",
                        QueueSettings::MIN_ACK_WAIT.as_secs(),
                        d.as_secs_f64()
                    ))
                } else {
                    Ok(d)
                }
            }),
        },
    );
    let max_deliver = v.field(
        "max_deliver",
        bounded(
            req.max_deliver,
            QueueSettings::DEFAULT_MAX_DELIVER,
            QueueSettings::MAX_MAX_DELIVER,
        ),
    );
    let max_ack_pending = v.field(
        "max_ack_pending",
        bounded(
            req.max_ack_pending,
            QueueSettings::DEFAULT_MAX_ACK_PENDING,
            QueueSettings::MAX_MAX_ACK_PENDING,
        ),
    );
    let settings = (|| {
        after?;
        Some(QueueSettings {
            deliver_policy: policy?,
            ack_wait: ack_wait?,
            max_deliver: max_deliver?,
            max_ack_pending: max_ack_pending?,
        })
    })();
    (v, settings)
}

/// 0 for the default, else at most `max`.
fn bounded(n: u32, default: u32, max: u32) -> Result<u32, String> {
    match n {
        0 => Ok(default),
        n if n > max => Err(format!("must be at most {max}, got {n}")),
        n => Ok(n),
    }
}

pub(super) async fn create(
    queues: &WorkQueues,
    req: &proto::CreateConsumerRequest,
) -> Result<proto::CreateConsumerResponse, Status> {
    let (mut v, settings) = settings(req);
    let name = v.field("name", parse_consumer(&req.name));
    let (name, settings) = v.finish(|| Some((name?, settings?)))?;
    let consumer = queues
        .store()
        .create(&name, &settings)
        .await
        .map_err(|e| match e {
            ConsumerError::Store(StoreError::BeyondLast { requested, last }) => {
                Error::SequenceBeyondLast {
                    field: "after_sequence",
                    requested,
                    last,
                }
            }
            ConsumerError::BehindRetention {
                delivered, first, ..
            } => Error::SequenceBeforeRetained {
                field: "after_sequence",
                requested: delivered,
                first,
            },
            e => e.into(),
        })?;
    Ok(proto::CreateConsumerResponse {
        consumer: Some(to_proto(&consumer)),
    })
}

pub(super) async fn fetch(
    queues: &WorkQueues,
    req: &proto::FetchNotificationsRequest,
    deadline: Option<Duration>,
) -> Result<proto::FetchNotificationsResponse, Status> {
    let mut v = Validator::default();
    let consumer = v.field("consumer", parse_consumer(&req.consumer));
    let max = v.field(
        "max_events",
        match req.max_events {
            n if n > MAX_FETCH => Err(format!("must be at most {MAX_FETCH}, got {n}")),
            n => Ok(n.max(1)),
        },
    );
    let wait = v.field(
        "wait",
        req.wait
            .as_ref()
            .map_or(Ok(Duration::ZERO), |d| duration_from_proto(d, MAX_WAIT)),
    );
    let (consumer, max, wait) = v.finish(|| Some((consumer?, max?, wait?)))?;
    // Answer (empty) before the caller gives up, rather than lease events
    // it will never see.
    let wait = deadline.map_or(wait, |d| wait.min(d.saturating_sub(d / 4)));
    let events = queues
        .fetch(&consumer, max, wait)
        .await
        .map_err(Error::from)?;
    Ok(proto::FetchNotificationsResponse {
        events: events
            .iter()
            .map(|l| proto::LeasedNotification {
                notification: Some(super::payment::to_proto(&l.notification)),
                delivery_count: l.delivery_count,
                lease_expires_at: Some(utc_to_timestamp(l.lease_expires_at)),
            })
            .collect(),
    })
}

pub(super) async fn ack(
    queues: &WorkQueues,
    req: &proto::AckNotificationsRequest,
) -> Result<proto::AckNotificationsResponse, Status> {
    let mut v = Validator::default();
    let consumer = v.field("consumer", parse_consumer(&req.consumer));
    let either = "give sequence (a cursor consumer) or sequences (a work-queue consumer)";
    let which = match (req.sequence, req.sequences.is_empty()) {
        (0, true) => v.field("sequence", Err(format!("is required: {either}"))),
        (0, false) => v.field("sequences", sequences(&req.sequences, false).map(Some)),
        (_, true) => Some(None),
        (_, false) => v.field("sequences", Err(format!("{either}, not both"))),
    };
    let (consumer, which) = v.finish(|| Some((consumer?, which?)))?;
    match which {
        None => {
            let acked = queues
                .store()
                .ack_cursor(&consumer, req.sequence)
                .await
                .map_err(Error::from)?;
            Ok(proto::AckNotificationsResponse {
                acked_sequence: acked,
                newly_acked: 0,
            })
        }
        Some(sequences) => {
            let acked = queues
                .ack(&consumer, &sequences)
                .await
                .map_err(Error::from)?;
            Ok(proto::AckNotificationsResponse {
                acked_sequence: acked.acked_sequence,
                newly_acked: acked.newly_acked,
            })
        }
    }
}

pub(super) async fn nak(
    queues: &WorkQueues,
    req: &proto::NakNotificationsRequest,
) -> Result<proto::NakNotificationsResponse, Status> {
    let mut v = Validator::default();
    let consumer = v.field("consumer", parse_consumer(&req.consumer));
    // Repeats are not folded here: `delivery_counts` pairs with each.
    let named = v.field(
        "sequences",
        sequences(&req.sequences, false).map(|_| req.sequences.clone()),
    );
    let counts = v.field(
        "delivery_counts",
        match req.delivery_counts.len() {
            0 => Ok(None),
            n if n != req.sequences.len() => Err(format!(
                "must give one count per sequence ({}), got {n}",
                req.sequences.len()
            )),
            _ if req.delivery_counts.contains(&0) => Err("delivery counts start at 1".to_owned()),
            _ => Ok(Some(req.delivery_counts.clone())),
        },
    );
    let delay = v.field(
        "delay",
        req.delay.as_ref().map_or(Ok(Duration::ZERO), |d| {
            duration_from_proto(d, QueueSettings::MAX_ACK_WAIT)
        }),
    );
    let (consumer, named, counts, delay) =
        v.finish(|| Some((consumer?, named?, counts?, delay?)))?;
    let nakked = queues
        .nak(&consumer, &named, counts.as_deref(), delay)
        .await
        .map_err(Error::from)?;
    Ok(proto::NakNotificationsResponse { nakked })
}

pub(super) async fn redrive(
    queues: &WorkQueues,
    req: &proto::RedriveNotificationsRequest,
) -> Result<proto::RedriveNotificationsResponse, Status> {
    let mut v = Validator::default();
    let consumer = v.field("consumer", parse_consumer(&req.consumer));
    let named = v.field("sequences", sequences(&req.sequences, true));
    let (consumer, named) = v.finish(|| Some((consumer?, named?)))?;
    let redriven = queues
        .redrive(&consumer, &named)
        .await
        .map_err(Error::from)?;
    Ok(proto::RedriveNotificationsResponse { redriven })
}

pub(super) async fn get(
    queues: &WorkQueues,
    req: &proto::GetConsumerRequest,
) -> Result<proto::GetConsumerResponse, Status> {
    let name = consumer_name(&req.name)?;
    let consumer = queues
        .store()
        .get(&name)
        .await
        .map_err(Error::from)?
        .ok_or(Error::ConsumerNotFound(name))?;
    Ok(proto::GetConsumerResponse {
        consumer: Some(to_proto(&consumer)),
    })
}

pub(super) async fn list(
    queues: &WorkQueues,
    req: &proto::ListConsumersRequest,
) -> Result<proto::ListConsumersResponse, Status> {
    let mut v = Validator::default();
    let page_size = v.field("page_size", super::payment::page_size(req.page_size));
    let after = v.field(
        "page_token",
        if req.page_token.is_empty() {
            Ok(String::new())
        } else {
            parse_consumer_reference(&req.page_token)
                .map_err(|_| "is not a page token this server gave".to_owned())
        },
    );
    let (page_size, after) = v.finish(|| Some((page_size?, after?)))?;
    let consumers = queues
        .store()
        .list(&after, page_size as usize)
        .await
        .map_err(Error::from)?;
    let next_page_token = match consumers.last() {
        Some(last) if consumers.len() == page_size as usize => last.name.clone(),
        _ => String::new(),
    };
    Ok(proto::ListConsumersResponse {
        consumers: consumers.iter().map(to_proto).collect(),
        next_page_token,
    })
}

pub(super) async fn delete(
    queues: &WorkQueues,
    req: &proto::DeleteConsumerRequest,
) -> Result<proto::DeleteConsumerResponse, Status> {
    let name = consumer_name(&req.name)?;
    if !queues.store().delete(&name).await.map_err(Error::from)? {
        return Err(Error::ConsumerNotFound(name).into());
    }
    Ok(proto::DeleteConsumerResponse {})
}

fn to_proto(c: &Consumer) -> proto::Consumer {
    let q = c.queue.as_ref();
    proto::Consumer {
        name: c.name.clone(),
        kind: match c.kind {
            Kind::Cursor => proto::ConsumerKind::Cursor,
            Kind::WorkQueue => proto::ConsumerKind::WorkQueue,
        } as i32,
        acked_sequence: c.acked_sequence,
        lag: c.lag,
        last_ack_at: c.last_ack_at.map(utc_to_timestamp),
        settings: q.map(|q| {
            let s = &q.settings;
            let (policy, after_sequence) = match s.deliver_policy {
                DeliverPolicy::All => (proto::DeliverPolicy::All, 0),
                DeliverPolicy::New => (proto::DeliverPolicy::New, 0),
                DeliverPolicy::AfterSequence(n) => (proto::DeliverPolicy::AfterSequence, n),
            };
            proto::ConsumerSettings {
                deliver_policy: policy as i32,
                after_sequence,
                ack_wait: Some(duration_to_proto(s.ack_wait)),
                max_deliver: s.max_deliver,
                max_ack_pending: s.max_ack_pending,
            }
        }),
        delivered_sequence: q.map_or(0, |q| q.delivered_sequence),
        leased: q.map_or(0, |q| q.leased),
        pending: q.map_or(0, |q| q.pending),
        redelivered: q.map_or(0, |q| q.redelivered),
        parked: q.map_or(0, |q| q.parked),
        parked_sequences: q.map_or_else(Vec::new, |q| q.parked_sequences.clone()),
        last_fetch_at: q.and_then(|q| q.last_fetch_at).map(utc_to_timestamp),
        streaming: c.streaming,
        created_at: c.created_at.map(utc_to_timestamp),
    }
}
