"""A fleet: several rtunnel servers (members) serving one set of tunnels
(docs/fleet.md). `ca` issues member certificates; `links` carries visitors
between members."""
