-- Retention (src/retention/): the sweep finds events past the horizon by
-- when they were received.
CREATE INDEX notifications_by_received_at ON notifications (received_at);
