defmodule Quichex.LoggingTest do
  # qlog files and NSS key logs.
  use ExUnit.Case, async: true

  import Quichex.Test.Helpers

  alias Quichex.{Connection, Listener, Stream}
  alias Quichex.Test.JSON

  setup do
    dir = Path.join(System.tmp_dir!(), "quichex-logs-#{System.unique_integer([:positive])}")
    File.mkdir_p!(dir)
    on_exit(fn -> File.rm_rf!(dir) end)
    %{dir: dir}
  end

  defp exchange(listener_opts, client_opts) do
    {listener, port} = start_listener(listener_opts)
    conn = connect!(port, client_opts)
    server = accept!(listener)
    {:ok, stream} = Connection.open_stream(conn, :bidirectional, active: false)
    :ok = Stream.send(stream, "hello qlog", fin: true)
    assert_receive {:quic_stream_opened, ^server, peer, _}
    assert_receive {:quic_stream, ^server, ^peer, "hello qlog"}
    {:ok, client_info} = Connection.info(conn)
    {:ok, server_info} = Connection.info(server)
    :ok = Connection.close(conn)
    eventually(fn -> not Process.alive?(conn) and not Process.alive?(server) end)
    Listener.stop(listener)
    {client_info, server_info}
  end

  test "one qlog per connection, named by its trace id, as JSON-SEQ records", %{dir: dir} do
    {client, server} =
      exchange(
        [config_opts: [qlog_dir: dir]],
        config_opts: [qlog_dir: dir, qlog_level: :extra]
      )

    for {info, vantage} <- [{client, "client"}, {server, "server"}] do
      path = Path.join(dir, info.trace_id <> ".sqlog")
      assert File.exists?(path), "no #{path} in #{inspect(File.ls!(dir))}"

      # RFC 7464: each record starts with RS (0x1E) and ends with LF.
      [header | events] =
        path
        |> File.read!()
        |> :binary.split(<<0x1E>>, [:global])
        |> Enum.reject(&(&1 == ""))
        |> Enum.map(&JSON.decode!/1)

      assert header["serialization_format"] == "JSON-SEQ"
      assert header["trace"]["vantage_point"]["type"] == vantage
      names = MapSet.new(events, & &1["name"])
      assert "quic:packet_sent" in names
      assert "quic:packet_received" in names
      assert Enum.all?(events, &is_number(&1["time"]))
    end
  end

  test "key log lines have the NSS format and the client random of the connection", %{dir: dir} do
    client_keys = Path.join(dir, "client.keys")
    server_keys = Path.join(dir, "server.keys")
    exchange([config_opts: [keylog_file: server_keys]], config_opts: [keylog_file: client_keys])

    parse = fn path ->
      for line <- path |> File.read!() |> String.split("\n", trim: true) do
        assert [label, random, secret] = String.split(line, " ")
        assert label =~ ~r/^[A-Z0-9_]+$/
        assert random =~ ~r/^[0-9a-f]{64}$/
        assert secret =~ ~r/^[0-9a-f]+$/ and rem(byte_size(secret), 2) == 0
        {label, random, secret}
      end
    end

    client = parse.(client_keys)
    server = parse.(server_keys)
    labels = MapSet.new(client, &elem(&1, 0))

    for label <-
          ~w(CLIENT_HANDSHAKE_TRAFFIC_SECRET SERVER_HANDSHAKE_TRAFFIC_SECRET CLIENT_TRAFFIC_SECRET_0 SERVER_TRAFFIC_SECRET_0),
        do: assert(label in labels)

    # One connection, one client random: the same on both sides, and both
    # sides derived the same secrets.
    assert [random] = client |> Enum.map(&elem(&1, 1)) |> Enum.uniq()
    assert [^random] = server |> Enum.map(&elem(&1, 1)) |> Enum.uniq()
    assert MapSet.new(client) == MapSet.new(server)
  end

  test "SSLKEYLOGFILE is honoured when keylog_file is unset" do
    # The environment is an argument here, so the VM's own stays untouched.
    env = "/tmp/from-env.keys"
    assert {:keylog_file, env} in Quichex.Config.to_native(Quichex.Config.new(), :client, env)

    own = Quichex.Config.new(keylog_file: "/tmp/own.keys")
    assert {:keylog_file, "/tmp/own.keys"} in Quichex.Config.to_native(own, :client, env)

    refute List.keymember?(
             Quichex.Config.to_native(Quichex.Config.new(), :client, nil),
             :keylog_file,
             0
           )
  end
end
