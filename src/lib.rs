//! nudge
