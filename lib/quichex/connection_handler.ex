defmodule Quichex.ConnectionHandler do
  @moduledoc """
  The plan's connection callback for listeners: a module with
  `handle_connection/2`, passed as `Quichex.Listener.start_link(connection_handler: Mod)`.

  For every connection whose handshake completes, `handle_connection(conn,
  peer_address)` runs in a fresh process linked to the connection. The
  connection has no controlling process until one takes it: call
  `Quichex.Connection.controlling_process(conn, pid)` (from the callback or
  from any process) to make `pid` receive the connection's messages (see
  `Quichex.Connection`). Streams the peer opens before that wait for it and
  are handed to the controlling process, each announced with
  `{:quic_stream_opened, ...}` first. Without one, the connection simply
  lives until the peer closes it or it idles out.

  Returning `{:error, reason}` closes the connection with application error
  code `#{Quichex.Handler.error_code()}`; a raise closes it with code 0.

      defmodule MyApp.ConnectionHandler do
        @behaviour Quichex.ConnectionHandler

        @impl true
        def handle_connection(conn, _peer_address) do
          {:ok, pid} = Task.start(fn -> MyApp.serve(conn) end)
          Quichex.Connection.controlling_process(conn, pid)
        end
      end

  For a fuller server behaviour, with callbacks per stream, see
  `Quichex.Handler`.
  """

  @doc "A connection completed its handshake; `peer_address` is `{ip, port}`."
  @callback handle_connection(
              conn :: pid(),
              peer_address :: {:inet.ip_address(), :inet.port_number()}
            ) ::
              :ok | {:error, term()}

  @doc false
  # Runs the callback for `conn` in a process linked to it.
  def start_link(module, conn, peer) do
    :proc_lib.spawn_link(fn ->
      case module.handle_connection(conn, peer) do
        {:error, reason} ->
          Quichex.Connection.close(conn,
            error_code: Quichex.Handler.error_code(),
            reason: inspect(reason, limit: 5)
          )

        _ok ->
          :ok
      end
    end)
  end
end
