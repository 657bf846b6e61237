# Echo server, the first of two terminals:
#
#     mix run examples/echo_server.exs                   # terminal 1
#     mix run examples/echo_client.exs hello quic        # terminal 2
#
# A Quichex.Listener on 127.0.0.1 (port 4433) whose handler sends every
# stream back to the client and finishes it when the client does. It prints
# each connection as it comes and goes. It uses the development certificate
# priv/cert/selfsigned.pem and priv/cert/selfsigned_key.pem, and writes them
# with Quichex.DevCert when they are missing (`mix quichex.gen.cert` writes
# the same files). Stop it with Ctrl-C twice.
#
# Options:
#   --port N         UDP port (default 4433; 0 picks a free one)
#   --cert PREFIX    certificate PREFIX.pem and key PREFIX_key.pem
#                    (default priv/cert/selfsigned)
#   --connections N  serve N connections, then exit
#
# With QUICHEX_EXAMPLE_SHORT=1 (how `make test` runs every example) it
# serves one connection unless --connections says otherwise, and gives up
# with exit status 1 when no client came or finished within 30 seconds.

defmodule EchoServer.Handler do
  @moduledoc "Echoes each stream back and finishes it; tells the script about connections."
  use Quichex.Handler

  # The initial state of the connection process and of every stream
  # process is the listener's `handler_options`: here `%{parent: pid}`.
  @impl Quichex.Handler
  def handle_connection(conn, state) do
    {:ok, %{peer_address: peer}} = Quichex.Connection.info(conn)
    send(state.parent, {:connected, conn, peer})
    {:continue, state}
  end

  @impl Quichex.Handler
  def handle_close(conn, reason, state), do: send(state.parent, {:closed, conn, reason})

  @impl Quichex.Handler
  def handle_data(data, stream, state) do
    :ok = Quichex.Stream.send(stream, data)
    {:continue, state}
  end

  @impl Quichex.Handler
  def handle_fin(stream, state) do
    :ok = Quichex.Stream.close(stream)
    {:close, state}
  end
end

defmodule EchoServer do
  @alpn "quichex-echo"
  @short System.get_env("QUICHEX_EXAMPLE_SHORT") in ["1", "true"]
  # In short mode: the longest wait for the next connection event.
  @short_wait_ms 30_000

  def main(argv) do
    {opts, _rest} =
      OptionParser.parse!(argv, strict: [port: :integer, cert: :string, connections: :integer])

    port = Keyword.get(opts, :port, 4433)
    limit = Keyword.get(opts, :connections, if(@short, do: 1, else: :infinity))
    %{cert: cert, key: key} = certificate!(Keyword.get(opts, :cert, "priv/cert/selfsigned"))

    config =
      Quichex.Config.new(
        application_protos: [@alpn],
        load_cert_chain_from_pem_file: cert,
        load_priv_key_from_pem_file: key
      )

    {:ok, listener} =
      Quichex.Listener.start_link(
        ip: {127, 0, 0, 1},
        port: port,
        config: config,
        handler: EchoServer.Handler,
        handler_options: %{parent: self()}
      )

    {:ok, {_ip, port}} = Quichex.Listener.sockname(listener)
    IO.puts("echo server listening on 127.0.0.1:#{port}")
    IO.puts("try: mix run examples/echo_client.exs --port #{port} --cacert #{cert} hello quic")

    served = serve(limit, 0)
    :ok = Quichex.Listener.stop(listener)
    IO.puts("served #{served} connection(s), bye")
  end

  # The certificate and key under `prefix`, written first if either is missing.
  defp certificate!(prefix) do
    paths = Quichex.DevCert.paths(prefix)

    if File.exists?(paths.cert) and File.exists?(paths.key) do
      paths
    else
      paths = Quichex.DevCert.write!(output: prefix)
      IO.puts("wrote a development certificate: #{paths.cert} (key #{paths.key})")
      paths
    end
  end

  defp serve(limit, served) when served == limit, do: served

  defp serve(limit, served) do
    receive do
      {:connected, _conn, peer} ->
        IO.puts("connection from #{format(peer)}")
        serve(limit, served)

      {:closed, _conn, reason} ->
        IO.puts("connection closed: #{inspect(reason)}")
        serve(limit, served + 1)
    after
      if(@short, do: @short_wait_ms, else: :infinity) ->
        IO.puts("FAIL: no connection event within #{@short_wait_ms} ms")
        System.halt(1)
    end
  end

  defp format({ip, port}), do: "#{:inet.ntoa(ip)}:#{port}"
end

EchoServer.main(System.argv())
