# Echo client, the second of two terminals (start examples/echo_server.exs
# in the first):
#
#     mix run examples/echo_client.exs hello quic        # lines from the arguments
#     mix run examples/echo_client.exs                   # lines from stdin, until EOF
#
# Connects to the echo server, verifying its certificate against the
# development certificate itself (it is self-signed: the client trusts it as
# its own CA, and checks that it names the host). It opens one
# bidirectional stream, sends each line, waits for the same bytes to come
# back and prints them. At the end it finishes the stream, waits for the
# server to finish its side, and closes the connection.
#
# Options:
#   --host NAME      server name or IP (default localhost)
#   --port N         server port (default 4433)
#   --cacert FILE    the certificate to trust (default priv/cert/selfsigned.pem)

defmodule EchoClient do
  @alpn "quichex-echo"

  def main(argv) do
    {opts, lines} =
      OptionParser.parse!(argv, strict: [host: :string, port: :integer, cacert: :string])

    host = Keyword.get(opts, :host, "localhost")
    port = Keyword.get(opts, :port, 4433)
    cacert = Keyword.get(opts, :cacert, "priv/cert/selfsigned.pem")

    config =
      Quichex.Config.new(application_protos: [@alpn], load_verify_locations_from_file: cacert)

    with {:ok, conn} <- Quichex.Connection.connect(host: host, port: port, config: config),
         :ok <- Quichex.Connection.wait_connected(conn, timeout: 5_000) do
      {:ok, info} = Quichex.Connection.info(conn)
      IO.puts("connected to #{host}:#{port} (ALPN #{info.alpn}, certificate verified)")
      session(conn, lines)
    else
      {:error, reason} -> fail("could not connect to #{host}:#{port}: #{message(reason)}")
    end
  end

  defp session(conn, lines) do
    {:ok, stream} = Quichex.Connection.open_stream(conn, :bidirectional, active: false)

    # From the arguments, or else line by line from stdin (lazily, so each
    # line is echoed as soon as it is typed).
    source = if lines == [], do: IO.stream(:stdio, :line), else: Enum.map(lines, &(&1 <> "\n"))

    Enum.each(source, fn line ->
      :ok = Quichex.Stream.send(stream, line)

      case Quichex.Stream.recv(stream, length: byte_size(line), timeout: 5_000) do
        {:ok, ^line, false} -> IO.puts("echo: " <> String.trim_trailing(line, "\n"))
        other -> fail("unexpected answer: #{inspect(other)}")
      end
    end)

    # Our FIN; the server answers with its own once it has echoed everything.
    :ok = Quichex.Stream.close(stream)

    case Quichex.Stream.recv(stream, timeout: 5_000) do
      {:ok, "", true} -> :ok
      other -> fail("expected the server to finish the stream, got: #{inspect(other)}")
    end

    :ok = Quichex.Connection.close(conn, error_code: 0, reason: "bye")

    receive do
      {:quic_connection_closed, ^conn, 0, :local} -> IO.puts("closed")
    after
      5_000 -> fail("no close message")
    end
  end

  defp message(%{__exception__: true} = error), do: Exception.message(error)
  defp message(reason), do: inspect(reason)

  defp fail(text) do
    IO.puts("FAIL: " <> text)
    System.halt(1)
  end
end

EchoClient.main(System.argv())
