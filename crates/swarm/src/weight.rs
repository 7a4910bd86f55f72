//! TODO: filled by the swarm work of issue #5.
