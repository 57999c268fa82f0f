//! `kongtie.v1.Payment`: orders, and the notification stream.

use std::{pin::Pin, sync::Arc, time::Duration};

use chrono::{SubsecRound, Utc};
use futures::{Stream, StreamExt, stream};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::consumers;
use crate::{
    consumers::WorkQueues,
    domain::{
        AmountFen, NewOrder, OpenId, OutTradeId, Validator, optional, parse_consumer,
        timestamp_to_utc, utc_to_timestamp,
    },
    error::Error,
    gateway::Gateway,
    metrics::Metrics,
    notify::{Subscription, run_subscription},
    orders::{Ledger, Order, OrderCheck, OrderState},
    proto::{self, payment_server::Payment},
    store::{NotificationStore, StoredNotification},
    upstream::wire,
};

use super::subscription_limits::{SubscriptionLimits, SubscriptionPolicy};

const DEFAULT_PAGE: u32 = 100;
const MAX_PAGE: u32 = 1000;

pub struct PaymentService {
    gateway: Arc<Gateway>,
    ledger: Arc<Ledger>,
    store: Arc<dyn NotificationStore>,
    queues: Arc<WorkQueues>,
    /// Flips to true at shutdown, ending every subscription.
    shutdown: watch::Receiver<bool>,
    metrics: Arc<Metrics>,
    /// Subscriptions end (UNAVAILABLE) after about this long, so that
    /// long-lived subscribers reconnect and spread over replicas.
    subscription_max_age: Option<Duration>,
    limits: SubscriptionLimits,
}

impl PaymentService {
    pub fn new(
        gateway: Arc<Gateway>,
        ledger: Arc<Ledger>,
        store: Arc<dyn NotificationStore>,
        queues: Arc<WorkQueues>,
        shutdown: watch::Receiver<bool>,
        metrics: Arc<Metrics>,
        subscriptions: SubscriptionPolicy,
    ) -> Self {
        Self {
            gateway,
            ledger,
            store,
            queues,
            shutdown,
            metrics,
            subscription_max_age: subscriptions.max_age,
            limits: subscriptions.limits,
        }
    }
}

impl PaymentService {
    fn order_to_proto(&self, o: &Order, now: chrono::DateTime<Utc>) -> proto::Order {
        let pay_params = o
            .usable_params(now, self.ledger.settings().prepay_ttl)
            .and_then(|text| serde_json::from_str::<wire::PayParams>(text).ok())
            .map(pay_params_to_proto);
        proto::Order {
            out_trade_id: o.out_trade_id.clone(),
            amount_fen: o.amount_fen,
            openid: o.openid.clone(),
            expires_at: Some(utc_to_timestamp(o.expires_at)),
            created_at: Some(utc_to_timestamp(o.created_at)),
            state: order_state_to_proto(o.state_at(now)) as i32,
            pay_params,
            paid_sequence: o.paid_sequence,
        }
    }

    /// Refuses a position past the newest stored sequence: waiting would
    /// never reach it (a position from another deployment, or from before a
    /// backup was restored). And one before the first retained sequence:
    /// the events between were deleted. 0, "from the start", starts at the
    /// first retained one.
    async fn within_stored(&self, field: &'static str, after: u64) -> Result<(), Status> {
        if after == 0 {
            return Ok(());
        }
        let last = self.store.last_sequence().await.map_err(Error::from)?;
        if after > last {
            return Err(Error::SequenceBeyondLast {
                field,
                requested: after,
                last,
            }
            .into());
        }
        within_retained(self.store.as_ref(), field, after).await
    }
}

/// Refuses a position `after` which events were deleted by retention
/// (`after` + 1 below the first retained sequence).
pub(super) async fn within_retained(
    store: &dyn NotificationStore,
    field: &'static str,
    after: u64,
) -> Result<(), Status> {
    let first = store
        .retention()
        .first_retained()
        .await
        .map_err(Error::from)?;
    if after.saturating_add(1) < first {
        return Err(Error::SequenceBeforeRetained {
            field,
            requested: after,
            first,
        }
        .into());
    }
    Ok(())
}

/// A page size: 0 for the default, at most [`MAX_PAGE`].
pub(super) fn page_size(n: u32) -> Result<u32, String> {
    match n {
        0 => Ok(DEFAULT_PAGE),
        n if n > MAX_PAGE => Err(format!("must be at most {MAX_PAGE}, got {n}")),
        n => Ok(n),
    }
}

/// The largest `ListNotifications` answer: what every gRPC client accepts
/// by default (4 MiB), less room for the envelope.
const MAX_PAGE_BYTES: usize = (4 << 20) - 1024;

/// As many of `notifications` as fit in [`MAX_PAGE_BYTES`] (at least one).
fn fit_page(
    notifications: impl Iterator<Item = proto::PaymentNotification>,
) -> Vec<proto::PaymentNotification> {
    use prost::Message;
    let mut page = Vec::new();
    let mut bytes = 0;
    for n in notifications {
        // The field's tag and length prefix: at most 1 + 5 bytes.
        bytes += n.encoded_len() + 6;
        if bytes > MAX_PAGE_BYTES && !page.is_empty() {
            break;
        }
        page.push(n);
    }
    page
}

type NotificationStream =
    Pin<Box<dyn Stream<Item = Result<proto::PaymentNotification, Status>> + Send>>;

#[tonic::async_trait]
impl Payment for PaymentService {
    async fn create_jsapi_order(
        &self,
        request: Request<proto::CreateJsapiOrderRequest>,
    ) -> Result<Response<proto::CreateJsapiOrderResponse>, Status> {
        let deadline = super::deadline(&request);
        let req = request.get_ref();
        let settings = self.gateway.settings();
        let now = Utc::now();
        let mut v = Validator::default();
        let out_trade_id = v.field("out_trade_id", OutTradeId::parse(&req.out_trade_id));
        let amount = v.field(
            "amount_fen",
            AmountFen::parse(req.amount_fen, settings.max_amount_fen),
        );
        let openid = v.field("openid", OpenId::parse(&req.openid));
        let latest = now + settings.max_order_expiry;
        let expires_at = v.field(
            "expires_at",
            match &req.expires_at {
                None => Ok(now + settings.order_window),
                Some(ts) => timestamp_to_utc(ts).and_then(|at| {
                    if at <= now {
                        Err(format!("must be in the future, got {}", at.to_rfc3339()))
                    } else if at > latest {
                        Err(format!(
                            "must be at most {} s ahead (until {}), got {}",
                            settings.max_order_expiry.as_secs(),
                            latest.to_rfc3339(),
                            at.to_rfc3339()
                        ))
                    } else {
                        Ok(at)
                    }
                }),
            },
        );
        let order = v.finish(|| {
            Some(NewOrder {
                out_trade_id: out_trade_id?,
                amount: amount?,
                openid: openid?,
                // To the second: what is sent upstream, and compared on a
                // repeat.
                expires_at: expires_at?.trunc_subsecs(0),
            })
        })?;
        tracing::Span::current().record("out_trade_id", order.out_trade_id.as_str());
        let created = self
            .ledger
            .create(&order, req.expires_at.is_some(), deadline)
            .await?;
        let p = created.params;
        Ok(Response::new(proto::CreateJsapiOrderResponse {
            pay_params: Some(pay_params_to_proto(p)),
            response_text: created.response_text,
        }))
    }

    async fn create_consumer(
        &self,
        request: Request<proto::CreateConsumerRequest>,
    ) -> Result<Response<proto::CreateConsumerResponse>, Status> {
        consumers::create(&self.queues, request.get_ref())
            .await
            .map(Response::new)
    }

    async fn fetch_notifications(
        &self,
        request: Request<proto::FetchNotificationsRequest>,
    ) -> Result<Response<proto::FetchNotificationsResponse>, Status> {
        let deadline = super::deadline(&request);
        consumers::fetch(&self.queues, request.get_ref(), deadline)
            .await
            .map(Response::new)
    }

    async fn nak_notifications(
        &self,
        request: Request<proto::NakNotificationsRequest>,
    ) -> Result<Response<proto::NakNotificationsResponse>, Status> {
        consumers::nak(&self.queues, request.get_ref())
            .await
            .map(Response::new)
    }

    async fn redrive_notifications(
        &self,
        request: Request<proto::RedriveNotificationsRequest>,
    ) -> Result<Response<proto::RedriveNotificationsResponse>, Status> {
        consumers::redrive(&self.queues, request.get_ref())
            .await
            .map(Response::new)
    }

    async fn get_consumer(
        &self,
        request: Request<proto::GetConsumerRequest>,
    ) -> Result<Response<proto::GetConsumerResponse>, Status> {
        consumers::get(&self.queues, request.get_ref())
            .await
            .map(Response::new)
    }

    async fn list_consumers(
        &self,
        request: Request<proto::ListConsumersRequest>,
    ) -> Result<Response<proto::ListConsumersResponse>, Status> {
        consumers::list(&self.queues, request.get_ref())
            .await
            .map(Response::new)
    }

    async fn delete_consumer(
        &self,
        request: Request<proto::DeleteConsumerRequest>,
    ) -> Result<Response<proto::DeleteConsumerResponse>, Status> {
        consumers::delete(&self.queues, request.get_ref())
            .await
            .map(Response::new)
    }

    async fn get_order(
        &self,
        request: Request<proto::GetOrderRequest>,
    ) -> Result<Response<proto::GetOrderResponse>, Status> {
        let req = request.get_ref();
        let mut v = Validator::default();
        let id = v.field("out_trade_id", OutTradeId::parse(&req.out_trade_id));
        let id = v.finish(|| id)?;
        tracing::Span::current().record("out_trade_id", id.as_str());
        let order = self
            .ledger
            .store()
            .get(id.as_str())
            .await
            .map_err(Error::from)?
            .ok_or_else(|| Error::OrderNotFound(id.as_str().to_owned()))?;
        Ok(Response::new(proto::GetOrderResponse {
            order: Some(self.order_to_proto(&order, Utc::now())),
        }))
    }

    async fn list_orders(
        &self,
        request: Request<proto::ListOrdersRequest>,
    ) -> Result<Response<proto::ListOrdersResponse>, Status> {
        let req = request.get_ref();
        let mut v = Validator::default();
        let state = v.field(
            "state",
            match proto::OrderState::try_from(req.state) {
                Ok(proto::OrderState::Unspecified) => Ok(None),
                Ok(state) => Ok(Some(order_state_from_proto(state))),
                Err(_) => Err(format!("{} is not an OrderState", req.state)),
            },
        );
        let page_size = v.field("page_size", page_size(req.page_size));
        let after = v.field("page_token", parse_page_token(&req.page_token));
        let (state, page_size, after) = v.finish(|| Some((state?, page_size?, after?)))?;
        let now = Utc::now();
        let orders = self
            .ledger
            .store()
            .list(state, after, page_size as usize, now)
            .await
            .map_err(Error::from)?;
        let next_page_token = if orders.len() == page_size as usize {
            orders
                .last()
                .map(|o| format!("{}.{}", o.created_at.timestamp_micros(), o.out_trade_id))
                .unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(proto::ListOrdersResponse {
            orders: orders.iter().map(|o| self.order_to_proto(o, now)).collect(),
            next_page_token,
        }))
    }

    type SubscribeNotificationsStream = NotificationStream;

    async fn subscribe_notifications(
        &self,
        request: Request<proto::SubscribeNotificationsRequest>,
    ) -> Result<Response<Self::SubscribeNotificationsStream>, Status> {
        // Its place among the server's and its connection's subscriptions,
        // held until its task ends.
        let admission = self.limits.admit(request.remote_addr())?;
        let req = request.into_inner();
        let mut v = Validator::default();
        let consumer = v.field("consumer", optional(&req.consumer, parse_consumer));
        let order = v.field(
            "out_trade_id",
            optional(&req.out_trade_id, OutTradeId::parse),
        );
        // A consumer's position covers every event: a stream that shows one
        // order's events only would let its acks move the position past
        // events nobody processed.
        let _ = v.field(
            "out_trade_id",
            match (&consumer, &order) {
                (Some(Some(_)), Some(Some(_))) => Err("cannot be combined with a consumer: its \
                     acknowledged position covers every event, and a filtered stream would \
                     skip the others; subscribe with the consumer and no filter (skipping \
                     other orders' events), or filter without a consumer from an \
                     after_sequence"
                    .to_owned()),
                _ => Ok(()),
            },
        );
        let (consumer, order) = v.finish(|| Some((consumer?, order?)))?;
        if let Some(order) = &order {
            tracing::Span::current().record("out_trade_id", order.as_str());
        }
        // A cursor consumer is read by one stream at a time: its hold, kept
        // while the stream lives, with its position.
        let (hold, acked) = match &consumer {
            Some(name) => {
                let (hold, acked) = self.queues.hold_stream(name).await.map_err(Error::from)?;
                (Some(hold), acked)
            }
            None => (None, 0),
        };
        let (after, field) = match (req.after_sequence, &consumer) {
            (Some(after), _) => (after, "after_sequence"),
            (None, Some(_)) => (acked, "consumer"),
            (None, None) => (0, "after_sequence"),
        };
        self.within_stored(field, after).await?;
        if after == 0 && consumer.is_some() {
            // A consumer's position is where it is, not "from the start".
            within_retained(self.store.as_ref(), field, after).await?;
        }
        let (tx, rx) = mpsc::channel(crate::notify::STREAM_BUFFER);
        let subscription = Subscription {
            store: Arc::clone(&self.store),
            after,
            out_trade_id: order.map(|o| o.as_str().to_owned()),
            shutdown: self.shutdown.clone(),
            // Jittered, so subscribers that connected together do not all
            // come back at once.
            max_age: self
                .subscription_max_age
                .map(|age| age.mul_f64(0.9 + 0.2 * rand::random::<f64>())),
            metrics: Arc::clone(&self.metrics),
        };
        let metrics = Arc::clone(&self.metrics);
        metrics.subscribers.inc();
        tokio::spawn(async move {
            let lost_tx = tx.clone();
            match hold {
                Some(mut hold) => {
                    tokio::select! {
                        () = run_subscription(subscription, tx, to_proto) => {}
                        () = hold.lost() => {
                            let _ = lost_tx.try_send(Err(Status::aborted(
                                "this stream lost its hold on the consumer (it was deleted, \
                                 or the store could not renew the hold); subscribe again",
                            )));
                        }
                    }
                    // Before the stream ends (`lost_tx` keeps it open), so
                    // that even at shutdown the client's next subscription,
                    // to any replica, is accepted at once.
                    hold.release().await;
                }
                None => run_subscription(subscription, tx, to_proto).await,
            }
            drop(lost_tx);
            metrics.subscribers.dec();
            drop(admission);
        });
        // A subscription never ends normally: whatever ended it, the client
        // should resubscribe, so a stream that closed without an error
        // status (its buffer was full) still ends UNAVAILABLE.
        let end = stream::once(async {
            Err(Status::unavailable(
                "the subscription ended; subscribe again to resume",
            ))
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx).chain(end))))
    }

    async fn ack_notifications(
        &self,
        request: Request<proto::AckNotificationsRequest>,
    ) -> Result<Response<proto::AckNotificationsResponse>, Status> {
        consumers::ack(&self.queues, request.get_ref())
            .await
            .map(Response::new)
    }

    async fn list_notifications(
        &self,
        request: Request<proto::ListNotificationsRequest>,
    ) -> Result<Response<proto::ListNotificationsResponse>, Status> {
        let req = request.get_ref();
        let mut v = Validator::default();
        let order = v.field(
            "out_trade_id",
            optional(&req.out_trade_id, OutTradeId::parse),
        );
        let page_size = v.field("page_size", page_size(req.page_size));
        let (order, page_size) = v.finish(|| Some((order?, page_size?)))?;
        self.within_stored("after_sequence", req.after_sequence)
            .await?;
        let mut page = self
            .store
            .list(
                req.after_sequence,
                order.as_ref().map(OutTradeId::as_str),
                page_size as usize,
            )
            .await
            .map_err(Error::from)?;
        let notifications = fit_page(page.drain(..).map(|n| to_proto(&n)));
        let next_after_sequence = notifications
            .last()
            .map_or(req.after_sequence, |n| n.sequence);
        Ok(Response::new(proto::ListNotificationsResponse {
            notifications,
            next_after_sequence,
        }))
    }
}

fn pay_params_to_proto(p: wire::PayParams) -> proto::JsapiPayParams {
    proto::JsapiPayParams {
        app_id: p.app_id,
        time_stamp: p.time_stamp,
        nonce_str: p.nonce_str,
        package: p.package,
        sign_type: p.sign_type,
        pay_sign: p.pay_sign,
    }
}

fn order_state_to_proto(state: OrderState) -> proto::OrderState {
    match state {
        OrderState::Unknown => proto::OrderState::Unknown,
        OrderState::Created => proto::OrderState::Created,
        OrderState::Paid => proto::OrderState::Paid,
        OrderState::Expired => proto::OrderState::Expired,
        OrderState::Failed => proto::OrderState::Failed,
    }
}

fn order_state_from_proto(state: proto::OrderState) -> OrderState {
    match state {
        proto::OrderState::Unspecified | proto::OrderState::Unknown => OrderState::Unknown,
        proto::OrderState::Created => OrderState::Created,
        proto::OrderState::Paid => OrderState::Paid,
        proto::OrderState::Expired => OrderState::Expired,
        proto::OrderState::Failed => OrderState::Failed,
    }
}

fn order_check_to_proto(check: Option<OrderCheck>) -> proto::OrderCheck {
    match check {
        None => proto::OrderCheck::Unspecified,
        Some(OrderCheck::Matched) => proto::OrderCheck::Matched,
        Some(OrderCheck::AmountMismatch) => proto::OrderCheck::AmountMismatch,
        Some(OrderCheck::UnknownOrder) => proto::OrderCheck::UnknownOrder,
        Some(OrderCheck::AlreadyPaid) => proto::OrderCheck::AlreadyPaid,
    }
}

/// A `ListOrders` page token: `{created_at in µs}.{out_trade_id}` of the
/// last order of the previous page.
fn parse_page_token(token: &str) -> Result<Option<(chrono::DateTime<Utc>, String)>, String> {
    if token.is_empty() {
        return Ok(None);
    }
    let bad = || "is not a page token this server gave".to_owned();
    let (micros, id) = token.split_once('.').ok_or_else(bad)?;
    let micros: i64 = micros.parse().map_err(|_| bad())?;
    let at = chrono::DateTime::from_timestamp_micros(micros).ok_or_else(bad)?;
    OutTradeId::parse(id).map_err(|_| bad())?;
    Ok(Some((at, id.to_owned())))
}

pub(super) fn to_proto(n: &StoredNotification) -> proto::PaymentNotification {
    proto::PaymentNotification {
        sequence: n.sequence,
        out_trade_id: n.out_trade_id.clone(),
        trade_order_id: n.trade_order_id.clone(),
        trade_bill_no: n.trade_bill_no.clone(),
        trade_status: n.trade_status.clone(),
        paid: n.trade_status == crate::upstream::wire::CODE_OK,
        message: n.message.clone(),
        trade_amount: n.trade_amount.clone(),
        amount_fen: n.amount_fen,
        trade_time: n.trade_time.clone(),
        received_at: Some(utc_to_timestamp(n.received_at)),
        receive_count: n.receive_count,
        order_check: order_check_to_proto(n.order_check) as i32,
    }
}
