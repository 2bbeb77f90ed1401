//! The `dashscope` adapter against its recorded fixtures and the simulator. SKELETON.
