//! shoal-csi library.
