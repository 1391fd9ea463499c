//! Test services (Redis, MariaDB, JuiceFS) started on loopback ports and cleaned up on drop.
