-- [ha] (docs/ha.md): the leader's session holds the server's advisory lock until its backend
-- exits. Should the leader's host vanish without closing its TCP connection, the backend would
-- wait for it for as long as the server's TCP keepalives allow (the Linux default is over two
-- hours), and nobody would reap meanwhile: probe an idle connection after 10 s, every 5 s, and
-- give up after 3 unanswered probes or 30 s of unacknowledged data. Ignored (and read as 0)
-- on a Unix socket, where a vanished client is seen at once.
SELECT pg_catalog.set_config(s.name,
                             CASE s.name
                                 WHEN 'tcp_keepalives_idle' THEN '10'
                                 WHEN 'tcp_keepalives_interval' THEN '5'
                                 WHEN 'tcp_keepalives_count' THEN '3'
                                 WHEN 'tcp_user_timeout' THEN '30000'
                             END,
                             false)
FROM pg_catalog.pg_settings s
WHERE s.name IN ('tcp_keepalives_idle', 'tcp_keepalives_interval', 'tcp_keepalives_count',
                 'tcp_user_timeout')
