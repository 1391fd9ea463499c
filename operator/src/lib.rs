//! shoal-operator library.
