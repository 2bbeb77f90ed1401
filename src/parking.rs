//! Parked messages back to work: republishes one to the exchange and routing key it was going to,
//! with its recorded properties, and marks it requeued. Shared by `parked --requeue` and the
//! console's requeue button.

use crate::broker::{BrokerError, Publisher};
use crate::messages::Envelope;
use crate::store::{ParkedMessage, Store, StoreError};

/// Why a parked message was not requeued.
#[derive(Debug, thiserror::Error)]
pub enum RequeueError {
    /// No parked message has that id.
    #[error("no parked message with id {0}")]
    NotFound(i64),
    /// The database could not be read or written.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The broker did not confirm the publish (the message stays parked, not marked).
    #[error("republishing the parked message: {0}")]
    Broker(#[from] BrokerError),
}

/// Republishes parked message `id` and marks it requeued; returns it as it was before.
///
/// # Errors
/// [`RequeueError`]: unknown id, database, or the publish was not confirmed (then nothing is
/// marked, so the operator can try again).
pub async fn requeue(
    store: &Store,
    publisher: &Publisher,
    id: i64,
) -> Result<ParkedMessage, RequeueError> {
    let parked = store
        .get_parked(id)
        .await?
        .ok_or(RequeueError::NotFound(id))?;
    let envelope = Envelope::from_recorded(
        parked.original_exchange.clone(),
        parked.routing_key.clone(),
        parked.body.clone(),
        &parked.headers,
    );
    publisher.publish(&envelope).await?;
    store.mark_requeued(id).await?;
    tracing::info!(
        parked_id = id,
        exchange = %parked.original_exchange,
        routing_key = %parked.routing_key,
        "parked message requeued"
    );
    Ok(parked)
}
