-- The floor: a plain server-side wait, as raw pgx's pg_advisory_lock.
\set k :client_id % 4
SELECT pg_advisory_lock(:k);
SELECT pg_advisory_unlock(:k);
