//! Several nodes as separate processes: ownership moves, kills, pauses, restarts.
